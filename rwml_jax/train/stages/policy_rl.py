"""Stage `policy_rl` (the paper's Stage 3): multi-turn GRPO on task success.

Each step takes `batch_tasks` training tasks in the cursor's order and plays `group_size` episodes of each
(same TaskSpec and reset seed, so a group sees the same game / user) with the *current* parameters through
the env pool (`rwml_jax.agent.rollout`, at most `max_episode_steps` turns; every turn is its own prompt
with the collect stage's short action history). The reward is terminal task success (1 / 0) with γ = 1:
every agent turn of an episode carries its episode's group-relative advantage, the groups being the G
episodes of one task (`Rollouts.from_episodes`). Only the agent's sampled tokens are trained (prompts and
observations are never in the completion mask); the sampler's log-probs are `old_logp`, the KL is to the
start model, and the clip / KL / loss-aggregation options are the rwml stage's, through the shared
`update_from_rollouts` and the sharded GRPO step. An episode whose env worker crashed is left out of the
update (logged and counted in `crashed`); the step goes on with the others. A step in which every group's
episodes all won or all lost (no advantage anywhere) is counted in `no_signal`; with
`policy_rl.skip_no_signal` it makes no update (its loss would be the KL term alone, which Adam would turn
into learning-rate-sized steps; verl-agent, the default, updates anyway).

Instances: `policy_rl@<init>` (init = base | wm_sft | rwml | expert_sft) run in their own folders
`<work_dir>/policy_rl@<init>`, so the arms of the paper's Table 1 live in one work dir; a plain
`policy_rl` starts from `policy_rl.init`. Every `eval_every` steps (and at step 0 and the end) the held-out
agent success is measured with the evaluation harness on the first `eval_size` tasks of the first
`eval.splits` split (τ²: the test split), logged under eval/ and plotted. Checkpoints hold the train state,
the task cursor and the RNG; a killed run resumes with the same steps and task order. Outputs:
`<stage>/model` (HF folder), `eval.jsonl`, `success_curve.png`, `batches.jsonl`, `metrics.jsonl`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from rwml_jax.agent.rollout import rollout
from rwml_jax.agent.trajectory import Trajectory
from rwml_jax.envs.base import TaskSpec
from rwml_jax.envs.host_pool import host_pool
from rwml_jax.evaluation import tasks as T
from rwml_jax.evaluation.policies import model_policy
from rwml_jax.models.hf_io import save_pretrained
from rwml_jax.rl.iteration import Rollouts, reward_metrics, update_from_rollouts
from rwml_jax.rl.train_state import OptimizerConfig
from rwml_jax.rl.update import GRPOConfig, make_grpo_step
from rwml_jax.sharding import batch_size_multiple
from rwml_jax.train.loop import TrainLoop
from rwml_jax.train.metrics_log import MetricsLogger, progress
from rwml_jax.train.plots import plot_reward_curve
from rwml_jax.train.policy import PolicySampler
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.served_models import serve_run_users
from rwml_jax.train.stage_io import Stage, StepRecords, policy_rl_init
from rwml_jax.train.stages.collect import training_tasks
from rwml_jax.train.stages.eval import play, policy_dir

# Config keys (sections or leaves) this stage's output depends on; see rwml_jax.train.stage_io.stage_deps.
CONFIG_KEYS = ("seed", "model", "env", "collect.history_length", "policy_rl", "optimizer", "eval.splits",
               "eval.data_dir", "eval.num_generated_games", "eval.max_steps", "eval.user")
# Of those, the ones that change speed or memory but not the output (fnmatch patterns).
IGNORED_KEYS = ("env.num_workers", "env.step_timeout_s", "policy_rl.max_live_episodes", "policy_rl.eval_every")

log = logging.getLogger(__name__)


def episode_source(rt: Runtime, stage: Stage) -> tuple[list[TaskSpec], str, dict[str, Any]]:
    """(training tasks, env factory, factory kwargs): ALFWorld train games (`env.split`), τ²'s train split
    with `env.user` ("scripted": the task's gold user turns; "local:<model>": served by `run`; "litellm:<model>"), at most
    `policy_rl.max_episode_steps` agent turns; `policy_rl.num_tasks` of them (-1 = all). Generated
    training games go to `<stage>/train_games` (the held-out ones to `<stage>/games/<split>`)."""
    c = rt.config
    p = c.policy_rl
    tasks, factory, kwargs = training_tasks(rt, stage.local_folder("train_games"), p.num_tasks)
    if c.env.name == "tau2":
        factory = T.TAU2_FACTORY
        kwargs = {"user": c.env.user, "max_steps": p.max_episode_steps, "user_temperature": c.env.user_temperature,
                  "max_messages": 10 * p.max_episode_steps + 20, "max_errors": 10}
    else:
        kwargs = {**kwargs, "max_steps": p.max_episode_steps}
    return tasks, factory, kwargs


def episode_rollouts(trajectories: list[Trajectory], group_size: int) -> tuple[Rollouts | None, dict[str, float]]:
    """The training rows of one step's episodes (ordered task by task, `group_size` each: group = task) and
    their metrics. Episodes cut by an env worker crash add no rows (and are counted in `crashed`); nor does
    the only survivor of a group (counted in `alone`)."""
    ok = [t for t in trajectories if t.error is None]
    crashed = [t for t in trajectories if t.error is not None]
    for t in crashed:
        log.warning("policy_rl: episode %s of task %s lost to an env failure, left out of the update: %s",
                    t.episode_id, t.task.task_id, t.error)
    turns = [[(tr.prompt_ids, tr.completion_ids, tr.logprobs) for tr in t.turns] if t.error is None else []
             for t in trajectories]
    rewards = np.array([float(t.success) for t in trajectories])
    groups = np.arange(len(trajectories)) // group_size
    keep = np.array([t.error is None for t in trajectories])
    lengths = np.array([t.num_steps for t in ok]) if ok else np.zeros(1)
    steps = sum(t.num_steps for t in ok)
    metrics = {
        "success": float(rewards[keep].mean()) if keep.any() else 0.0,
        "invalid_action_rate": sum(t.num_invalid for t in ok) / max(steps, 1),
        "format_error_rate": sum(t.num_format_errors for t in ok) / max(steps, 1),
        "episode_len_mean": float(lengths.mean()), "episode_len_max": float(lengths.max()),
        "truncated": float(np.mean([t.truncated for t in ok])) if ok else 0.0,
        "crashed": float(len(crashed)), "episodes": float(len(ok)), "turns": float(steps),
    }
    if keep.any():
        metrics.update(reward_metrics(rewards[keep], groups[keep]))
    # a group left with one episode by crashes has no group baseline: its survivor is not trained on either
    survivors = np.bincount(groups[keep], minlength=groups.max() + 1) if keep.any() else np.zeros(1, int)
    alone = [i for i in range(len(trajectories)) if keep[i] and survivors[groups[i]] < 2]
    for i in alone:
        turns[i] = []
    metrics["alone"] = float(len(alone))
    if not any(turns):
        return None, metrics
    return Rollouts.from_episodes(turns, rewards, groups), metrics


class SuccessEval(StepRecords):
    """Held-out agent success of the stage's current parameters, appended to `<stage>/eval.jsonl` and logged."""

    def __init__(self, rt: Runtime, stage: Stage, policy: PolicySampler, logger: MetricsLogger):
        super().__init__(stage.file("eval.jsonl"))
        self.rt, self.stage, self.policy, self.logger = rt, stage, policy, logger

    def __call__(self, step: int, params: Any) -> dict[str, Any]:
        c, p = self.rt.config, self.rt.config.policy_rl
        gen = model_policy(self.policy.generate_fn(params, temperature=p.eval_temperature, seed=c.seed))
        splits = (c.eval.splits[0],) if c.env.name == "alfworld" else None
        evals = play(self.rt, self.stage, gen, f"eval/step_{step:05d}", limit=p.eval_size if p.eval_size >= 0 else None,
                     runs=p.eval_runs, settings={"policy": self.stage.name, "step": step,
                                                 "temperature": p.eval_temperature}, splits=splits)
        (where, res), = evals.items()
        o = res["scores"]["overall"]
        rec = {"step": step, "split": where, "success": o["success_mean"], "invalid_action_rate": o["invalid_action_rate"],
               "episodes": o["episodes"], "crashed": o["crashed"]}
        self.append(rec)
        self.logger.scalars(step, {k: v for k, v in rec.items() if k not in ("step", "split")}, prefix="eval/")
        log.info("%s step %d: held-out success %.3f on %s (invalid actions %.2f)", self.stage.name, step,
                 rec["success"], where, rec["invalid_action_rate"])
        return rec


def run(rt: Runtime, *, force: bool = False, name: str = "policy_rl") -> dict[str, Any]:
    c = rt.config
    p = c.policy_rl
    G = p.group_size
    stage = Stage(rt.work_dir, name)
    if stage.begin(c, force=force) == "done":
        return stage.read_done().get("summary", {})
    init = policy_rl_init(c, name)
    source = policy_dir(rt, init)
    model_config, start_params = rt.load_model(source)
    tokenizer = rt.tokenizer()
    execution = rt.execution(model_config)
    policy = PolicySampler(model_config, tokenizer, rt.mesh, max_prompt_tokens=p.max_prompt_tokens,
                           max_new_tokens=p.max_new_tokens, weight_format=execution.weight_format)
    tasks, factory, kwargs = episode_source(rt, stage)
    if len(tasks) < p.batch_tasks:
        raise ValueError(f"{name}: {len(tasks)} training tasks cannot fill a batch of policy_rl.batch_tasks={p.batch_tasks}")

    opt = OptimizerConfig(learning_rate=p.learning_rate, warmup_steps=p.warmup_steps, weight_decay=p.weight_decay,
                          max_grad_norm=p.max_grad_norm, b1=c.optimizer.b1, b2=c.optimizer.b2, eps=c.optimizer.eps)
    loop = TrainLoop(stage.path, rt.mesh, model_config, opt, len(tasks), p.batch_tasks, p.steps, c.seed,
                     every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep)
    # the number of agent turns varies step to step: rows are padded to micro x 2^k (see update_from_rollouts)
    shards = batch_size_multiple(rt.mesh)
    micro = -(-p.micro_batch_size // shards) * shards
    grpo_cfg = GRPOConfig(clip_eps_low=p.clip_eps_low, clip_eps_high=p.clip_eps_high, kl_coef=p.kl_coef,
                          kl_estimator=p.kl_estimator, loss_agg=p.loss_agg, micro_batch_size=micro,
                          temperature=p.temperature)
    step_fn = make_grpo_step(model_config, grpo_cfg, loop.optimizer, rt.mesh, execution=execution)
    ref_params = start_params if grpo_cfg.uses_reference else None
    skip_no_signal = p.skip_no_signal

    state, cursor, first = loop.start(lambda: start_params)
    logger = MetricsLogger.for_stage(stage.path, c, resume_step=first or None)
    evaluator = SuccessEval(rt, stage, policy, logger)
    evaluator.truncate(first if first else -1)  # records past the restored step (all of them on a fresh start)
    if first == 0:
        evaluator(0, state.params)
    width = max(1, min(p.max_live_episodes, p.batch_tasks * G))
    workers = min(width, c.env.num_workers or os.cpu_count() or 1)
    bar = progress(p.steps, name, initial=first)
    try:
        tau2 = c.env.name == "tau2"
        with (serve_run_users(rt, (c.env.user,)) if tau2 else contextlib.nullcontext({})) as endpoints, \
                host_pool(factory, num_envs=width, num_workers=workers,
                          factory_kwargs={**kwargs, **({"endpoints": endpoints} if tau2 else {})},
                          step_timeout=c.env.step_timeout_s, run_tag=f"{name.replace('@', '-')}-s{c.seed}") as pool:
            for step, idx, key in loop.steps(cursor, first):
                t0 = time.perf_counter()
                seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
                # one reset seed per step, shared by the G episodes of a task
                batch = [dataclasses.replace(tasks[i], seed=c.seed + step) for i in idx]
                gen = policy.generate_fn(state.params, temperature=p.temperature, top_p=p.top_p, seed=seed,
                                         with_ids=True)
                result = rollout(pool, batch, gen, trajectories_per_task=G, history_length=c.collect.history_length,
                                 max_turns=p.max_episode_steps, record_prompts=False,
                                 provenance={"stage": name, "step": step, "seed": c.seed})
                t_roll = time.perf_counter() - t0
                rollouts, metrics = episode_rollouts(result.trajectories, G)
                adv = rollouts.advantages(normalize_std=p.normalize_std) if rollouts is not None else None
                metrics["no_signal"] = float(adv is not None and not np.any(adv))
                if rollouts is None:
                    log.warning("%s step %d: no episode survived to train on; the step makes no update", name, step)
                elif metrics["no_signal"] and skip_no_signal:
                    # every group won or lost alike: the loss is the KL term alone, whose tiny gradient
                    # Adam would turn into learning-rate-sized steps; the step makes no update
                    log.info("%s step %d: no group has a success signal; the step makes no update", name, step)
                else:
                    state, m = update_from_rollouts(
                        step_fn, state, rollouts, adv,
                        pad_id=tokenizer.pad_token_id, completion_len=p.max_new_tokens, prompt_multiple=128,
                        ref_params=ref_params, row_multiple=micro)
                    metrics.update(m)
                metrics.update({"time/rollout_s": t_roll, "time/step_s": time.perf_counter() - t0,
                                "tokens_per_s": result.stats.output_tokens / max(result.stats.generate_seconds, 1e-9)})
                done = step + 1
                if done % c.logging.log_every == 0:
                    logger.scalars(done, metrics, prefix="train/")
                if done % p.eval_every == 0 or done == p.steps:
                    evaluator(done, state.params)
                loop.maybe_save(done, state, cursor, force=done == p.steps)
                bar.update(1)
                bar.set_postfix(success=f"{metrics['success']:.2f}", invalid=f"{metrics['invalid_action_rate']:.2f}")
    finally:
        bar.close()
        loop.close()
        logger.flush()

    save_pretrained(model_config, state.params, stage.file("model"), tokenizer=tokenizer)
    evals = evaluator.records()
    plot_reward_curve(stage.file("success_curve.png"), {name: [(e["step"], e["success"]) for e in evals]},
                      title=f"{c.name}: held-out agent success ({name}, from {init})",
                      ylabel="success rate (held-out tasks)")
    logger.image(p.steps, f"{name}/success_curve", stage.file("success_curve.png"))
    logger.close()
    summary = {
        "init": init, "start_model": source, "steps": p.steps, "train_tasks": len(tasks),
        "success_before": evals[0]["success"], "success_after": evals[-1]["success"],
        "invalid_before": evals[0]["invalid_action_rate"], "invalid_after": evals[-1]["invalid_action_rate"],
        "eval_curve": [(e["step"], e["success"]) for e in evals],
    }
    stage.finish(c, summary=summary, outputs=["model/config.json", "eval.jsonl", "success_curve.png"])
    return summary
