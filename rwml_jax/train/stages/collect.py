"""Stage 1, `collect`: the policy rolls out N trajectories per training task in the real environment.

All live episodes are generated together each turn (batched multi-turn generation) while the
environments step in worker processes. Output: `collect/trajectories.jsonl` (one `Trajectory` per
line, with provenance: model, config hash, seed) and the rollout statistics in DONE.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from rwml_jax.agent.rollout import rollout
from rwml_jax.config import config_hash, config_to_dict
from rwml_jax.envs.alfworld_data import list_games
from rwml_jax.envs.alfworld_gen import generate_games
from rwml_jax.envs.base import TaskSpec
from rwml_jax.envs.host_pool import host_pool
from rwml_jax.train.metrics_log import progress
from rwml_jax.train.policy import PolicySampler
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.served_models import serve_run_users
from rwml_jax.train.stage_io import Stage, write_jsonl

# Config keys (sections or leaves) this stage's output depends on; see rwml_jax.train.stage_io.stage_deps.
CONFIG_KEYS = ("seed", "model", "env", "collect")
# Of those, the ones that change speed or memory but not the output (fnmatch patterns).
IGNORED_KEYS = ("env.num_workers", "env.step_timeout_s", "collect.max_live_episodes")

log = logging.getLogger(__name__)


def training_tasks(rt: Runtime, games_dir: Path, num_tasks: int | None = None) -> tuple[list[TaskSpec], str, dict[str, Any]]:
    """(tasks, env factory import path, factory kwargs) for the recipe's environment and split: a seeded
    choice of `num_tasks` of them (default `collect.num_tasks`; -1 = all); generated games (seeded by
    `seed`: the same games wherever they are made) go to `games_dir`."""
    c = rt.config
    e = c.env
    if e.name == "alfworld":
        data_dir = e.data_dir
        if data_dir == "generated":
            data_dir = os.fspath(games_dir)
            if not os.path.exists(os.path.join(data_dir, "generation.json")):
                generate_games(data_dir, e.num_generated_games, seed=c.seed,
                               task_types=list(e.task_types) or None)
        games = list_games(data_dir or None, e.split, tuple(e.task_types) or None)
        ids = [g.task_id for g in games]
        kwargs = {"data_dir": data_dir or None, "max_steps": e.max_steps}
        factory = "rwml_jax.envs.alfworld_env:AlfworldEnv"
        tasks = [TaskSpec("alfworld", e.split, t, seed=c.seed) for t in ids]
    elif e.name == "tau2":
        from rwml_jax.envs.tau2_env import list_task_ids

        tasks = [TaskSpec("tau2", e.split, t, seed=c.seed, options=(("domain", d),))
                 for d in e.domains for t in list_task_ids(d, e.split)]
        factory = "rwml_jax.envs.tau2_env:make_env"
        kwargs = {"user": e.user, "user_alt": e.user_alt, "max_steps": e.max_steps,
                  "user_temperature": e.user_temperature}
    else:
        raise ValueError(f"unknown env.name {e.name!r}; expected 'alfworld' or 'tau2'")
    num_tasks = c.collect.num_tasks if num_tasks is None else num_tasks
    if 0 <= num_tasks < len(tasks):
        pick = np.random.default_rng(c.seed).choice(len(tasks), num_tasks, replace=False)
        tasks = [tasks[i] for i in sorted(pick)]
    if not tasks:
        raise ValueError(f"no training tasks found for env {e.name!r} (split {e.split!r}, data_dir {e.data_dir!r})")
    return tasks, factory, kwargs


def user_mix(n: int, fraction: float, alt: str):
    """The rollout's `sample_task` for τ²'s two-simulator mix: of the N samples of a task, the last
    round(fraction * N) play against `alt` (TaskSpec option ("user", "alt")); None without an alt user."""
    if not alt:
        return None
    n_alt = round(fraction * n)

    def sample_task(task: TaskSpec, k: int) -> TaskSpec:
        return dataclasses.replace(task, options=(*task.options, ("user", "alt"))) if k >= n - n_alt else task

    return sample_task


def run(rt: Runtime, *, force: bool = False) -> dict[str, Any]:
    c = rt.config
    stage = Stage(rt.work_dir, "collect")
    if stage.begin(c, force=force) == "done":
        return stage.read_done().get("summary", {})
    tasks, factory, kwargs = training_tasks(rt, stage.local_folder("games"))
    source = rt.policy_source()
    model_config, params = rt.load_model(source)
    policy = PolicySampler(model_config, rt.tokenizer(), rt.mesh, max_prompt_tokens=c.collect.max_prompt_tokens,
                           max_new_tokens=c.collect.max_new_tokens, weight_format=rt.execution(model_config).weight_format)
    n_eps = len(tasks) * c.collect.trajectories_per_task
    width = max(1, min(c.collect.max_live_episodes, n_eps))
    workers = min(width, c.env.num_workers or os.cpu_count() or 1)
    bar = progress(None, "collect", unit="turn")
    tau2 = c.env.name == "tau2"
    # a fixed run tag: the episode ids (and so the triplet ids the train/val split sorts) repeat run to run
    with (serve_run_users(rt, (c.env.user, c.env.user_alt)) if tau2 else contextlib.nullcontext({})) as endpoints, \
            host_pool(factory, num_envs=width, num_workers=workers,
                      factory_kwargs={**kwargs, **({"endpoints": endpoints} if tau2 else {})},
                      step_timeout=c.env.step_timeout_s, run_tag=f"collect-s{c.seed}") as pool:
        result = rollout(
            pool, tasks, policy.generate_fn(params, temperature=c.collect.temperature, top_p=c.collect.top_p, seed=c.seed),
            trajectories_per_task=c.collect.trajectories_per_task, history_length=c.collect.history_length,
            max_turns=c.env.max_steps, record_prompts=c.env.name == "alfworld",
            provenance={"model": source, "config_hash": config_hash(config_to_dict(c)), "seed": c.seed, "stage": "collect"},
            on_turn=lambda stats, live: (bar.update(1), bar.set_postfix(live=live, success=f"{stats.success_rate:.2f}")),
            sample_task=user_mix(c.collect.trajectories_per_task, c.env.user_mix, c.env.user_alt) if tau2 else None,
        )
    bar.close()
    if result.stats.crashed == result.stats.episodes:
        errors = sorted({t.error for t in result.trajectories if t.error})
        raise RuntimeError(f"collect: every one of the {result.stats.episodes} episodes crashed; first errors: {errors[:3]}")
    write_jsonl(stage.file("trajectories.jsonl"), [t.to_dict() for t in result.trajectories])
    summary = {"tasks": len(tasks), **result.stats.as_dict()}
    if tau2:
        summary["by_user"] = {u: sum(t.reset_info.get("user") == u for t in result.trajectories)
                              for u in dict.fromkeys((c.env.user, c.env.user_alt)) if u}
    if result.stats.truncated_outputs:
        log.warning("collect: %d of %d policy outputs were cut at collect.max_new_tokens=%d", result.stats.truncated_outputs,
                    result.stats.steps, c.collect.max_new_tokens)
    stage.finish(c, summary=summary, outputs=["trajectories.jsonl"])
    log.info("collect: %s", summary)
    return summary
