"""Play a policy on an evaluation split through the env pool and score it, resumably.

    result = evaluate(tasks, policy, out="eval/alfworld_valid_seen.json", env="alfworld", runs=3,
                      factory=ALFWORLD_FACTORY, factory_kwargs={...}, max_steps=30)

Every (run, task) pair is one episode; run r resets its tasks with seed `seed + r` (τ² user sampling, …)
and every live episode of every run is generated together each turn (`rwml_jax.agent.rollout`). Files,
next to `out` (a .json path):

* ``<stem>.episodes.jsonl``: one record per finished episode, appended (fsync'd) as soon as it ends: the
  evaluation's resume point. A killed evaluation re-run with the same settings plays only the episodes
  without a record (and the crashed ones again);
* ``<stem>.trajectories.jsonl``: the full trajectory of each episode (record field "trajectory" =
  "<file>#<key>");
* ``<stem>.settings.json``: what was evaluated; a re-run with different settings refuses to mix them;
* ``out`` (the scores and every record, sorted, no timings: an interrupted and resumed evaluation writes
  the same file as an uninterrupted one) and ``<stem>.md`` (the markdown table).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rwml_jax import storage
from rwml_jax.agent.rollout import Trajectory, rollout
from rwml_jax.envs import TAU2_DOMAINS
from rwml_jax.envs.alfworld_data import TASK_TYPES
from rwml_jax.envs.host_pool import host_pool
from rwml_jax.envs.pool import resolve_factory
from rwml_jax.evaluation.metrics import INVALID_CALL_KINDS, pct, summarize
from rwml_jax.evaluation.tasks import GUARDED_FACTORY, LOAD_ERROR, EvalTask, classify_tool_calls
from rwml_jax.train.stage_io import append_jsonl, atomic_write_json, atomic_write_text, read_json, read_jsonl

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalPaths:
    out: Path

    @property
    def stem(self) -> Path:
        return self.out.with_suffix("") if self.out.suffix == ".json" else self.out

    @property
    def episodes(self) -> Path:
        return self.stem.with_name(self.stem.name + ".episodes.jsonl")

    @property
    def trajectories(self) -> Path:
        return self.stem.with_name(self.stem.name + ".trajectories.jsonl")

    @property
    def settings(self) -> Path:
        return self.stem.with_name(self.stem.name + ".settings.json")

    @property
    def markdown(self) -> Path:
        return self.stem.with_name(self.stem.name + ".md")


def episode_key(run: int, task: EvalTask) -> str:
    return f"r{run}/{task.group}/{task.task_id}"


def _record(run: int, seed: int, task: EvalTask, traj: Trajectory | None, traj_ref: str | None) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "key": episode_key(run, task), "run": run, "seed": seed, "env": task.spec.env, "split": task.spec.split,
        "group": task.group, "task_id": task.task_id, "status": "ok", "success": False, "reward": 0.0,
        "steps": 0, "invalid_actions": 0, "format_errors": 0, "error": None, "trajectory": traj_ref,
    }
    if task.spec.env == "alfworld":
        rec["task_type"] = task.group
    else:
        rec["domain"] = task.group
        rec.update(tool_calls=0, invalid_tool_calls=dict.fromkeys(INVALID_CALL_KINDS, 0))
    if traj is None:
        rec.update(status="load_error", error=task.load_error)
        return rec
    rec.update(reward=float(traj.reward), steps=traj.num_steps, invalid_actions=traj.num_invalid,
               format_errors=traj.num_format_errors, truncated=traj.truncated)
    if traj.error is not None:
        rec.update(status="load_error" if traj.error.startswith(LOAD_ERROR) and not traj.turns else "crashed",
                   error=traj.error)
    if task.spec.env == "tau2":
        from tau2.metrics.agent_metrics import is_successful  # τ²'s own success test on its reward

        rec["success"] = bool(traj.done and is_successful(traj.reward))
        for t in traj.turns:
            n, bad = classify_tool_calls(t.action, task.group)
            rec["tool_calls"] += n
            for k, v in bad.items():
                rec["invalid_tool_calls"][k] += v
    else:
        rec["success"] = bool(traj.success)
    return rec


def evaluate(tasks: Sequence[EvalTask], generate_fn: Callable[..., Sequence[Any]], *, out: str | os.PathLike,
             env: str, runs: int, seed: int, factory: str, factory_kwargs: dict[str, Any], max_steps: int,
             settings: dict[str, Any], num_envs: int = 16, num_workers: int = 0, history_length: int = 2,
             step_timeout: float = 120.0, on_episode: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evaluate `generate_fn(prompts, contexts)` (see `rwml_jax.evaluation.policies`) on `tasks`, `runs`
    times; resumes from the records next to `out`. Returns the result written to `out`."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not tasks:
        raise ValueError("nothing to evaluate: the task list is empty")
    resolve_factory(factory)  # a wrong import path fails here, not in every worker
    paths = EvalPaths(storage.as_path(out))
    paths.stem.parent.mkdir(parents=True, exist_ok=True)
    settings = {**settings, "env": env, "runs": runs, "seed": seed, "max_steps": max_steps,
                "history_length": history_length, "tasks": [episode_key(0, t) for t in tasks]}
    settings = json.loads(json.dumps(settings))
    if paths.settings.exists():
        old = read_json(paths.settings)
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"{paths.episodes} holds episodes of a different evaluation (differs in {diff}); "
                             f"write to another --json path or delete {paths.stem}.* to start over")
    else:
        for p in (paths.episodes, paths.trajectories):
            if p.exists() and storage.is_writer():
                p.unlink()  # leftovers of an evaluation whose settings file never got written
        atomic_write_json(paths.settings, settings)
    storage.sync("eval-settings")  # every process has read the folder before any episode is added

    done: dict[str, dict[str, Any]] = {}
    if paths.episodes.exists():
        for r in read_jsonl(paths.episodes):
            done[r["key"]] = r
    todo: list[tuple[int, EvalTask]] = []
    for run in range(runs):
        for t in tasks:
            rec = done.get(episode_key(run, t))
            if rec is not None and rec["status"] != "crashed":
                continue
            if t.load_error is not None:
                rec = _record(run, seed + run, t, None, None)
                append_jsonl(paths.episodes, [rec])
                done[rec["key"]] = rec
                continue
            todo.append((run, t))
    if done:
        log.info("evaluation: %d episodes already recorded in %s, %d to play", len(done), paths.episodes, len(todo))

    if todo:
        specs = [dataclasses.replace(t.spec, seed=seed + run) for run, t in todo]

        def finished(i: int, traj: Trajectory) -> None:
            run, t = todo[i]
            key = episode_key(run, t)
            append_jsonl(paths.trajectories, [{"key": key, **traj.to_dict()}], fsync=False)
            rec = _record(run, seed + run, t, traj, f"{paths.trajectories.name}#{key}")
            append_jsonl(paths.episodes, [rec])  # after its trajectory: a record means both are on disk
            done[key] = rec
            if on_episode is not None:
                on_episode(rec)

        width = max(1, min(num_envs, len(todo)))
        workers = max(1, min(width, num_workers or os.cpu_count() or 1))
        with host_pool(GUARDED_FACTORY, num_envs=width, num_workers=workers,
                     factory_kwargs={"factory": factory, **factory_kwargs},
                     step_timeout=step_timeout, run_tag=f"eval-s{seed}") as pool:
            rollout(pool, specs, generate_fn, history_length=history_length, max_turns=max_steps,
                    record_prompts=False, provenance={"evaluation": settings.get("policy")},
                    on_episode=finished, with_context=True)

    keys = [episode_key(run, t) for run in range(runs) for t in tasks]
    records = [done[k] for k in keys]
    groups = TASK_TYPES if env == "alfworld" else TAU2_DOMAINS
    result = {"settings": settings, "scores": summarize(records, runs, env, groups),
              "crashed": [r["key"] for r in records if r["status"] == "crashed"],
              "load_errors": sorted({r["error"] if r["error"].startswith(LOAD_ERROR) else f"{r['task_id']}: {r['error']}"
                                     for r in records if r["status"] == "load_error"}),
              "episodes": records}
    atomic_write_text(paths.out, json.dumps(result, indent=1, allow_nan=True, sort_keys=True) + "\n")
    atomic_write_text(paths.markdown, markdown(result) + "\n")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The evaluation as a markdown table: one row per task type / domain, then the total."""
    s, sc = result["settings"], result["scores"]
    tau2 = s["env"] == "tau2"
    runs = s["runs"]
    head = f"**{s.get('policy', '?')}** on {s['env']} {s.get('split', '')}: {runs} run(s), at most {s['max_steps']} steps"
    if tau2:
        ks = [str(k) for k in range(1, runs + 1)]
        cols = ["domain", "tasks", "success (mean ± std)", *[f"pass^{k}" for k in ks], "invalid tool calls",
                "invalid actions", "crashed"]
    else:
        cols = ["task type", "games", "success (mean ± std)", "invalid actions", "steps (successes)", "crashed"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def row(name: str, g: dict[str, Any]) -> str:
        base = [name, str(g["tasks"]), pct(g["success_mean"], g["success_std"])]
        if tau2:
            base += [pct(g["pass_hat_k"][k]) for k in ks] + [pct(g["invalid_tool_call_rate"]),
                                                             pct(g["invalid_action_rate"]), str(g["crashed"])]
        else:
            steps = g["mean_steps_success"]
            base += [pct(g["invalid_action_rate"]), "-" if math.isnan(steps) else f"{steps:.1f}", str(g["crashed"])]
        return "| " + " | ".join(base) + " |"

    for name, g in sc["groups"].items():
        lines.append(row(name, g))
    lines.append(row("**total**", sc["overall"]))
    if tau2 and "average" in sc:
        a = sc["average"]
        lines.append(f"\nAverage over domains: success {pct(a['success_mean'], a['success_std'])}, "
                     + ", ".join(f"pass^{k} {pct(v)}" for k, v in a["pass_hat_k"].items())
                     + f", invalid tool calls {pct(a['invalid_tool_call_rate'])}")
    if result["load_errors"]:
        lines.append(f"\n{len(result['load_errors'])} task(s) could not be loaded (scored as failures):")
        lines += [f"- {e}" for e in result["load_errors"]]
    if result["crashed"]:
        lines.append(f"\n{len(result['crashed'])} episode(s) lost to env worker crashes (not scored; re-run to "
                     f"replay them): " + ", ".join(result["crashed"][:10]))
    return "\n".join(lines)
