"""Stage `eval`: agent success of the recipe's model, scored by the evaluation harness.

The policy is the model of the last model-producing stage before `eval` in `stages` (warmstart, rwml,
wm_sft), or `eval.model` ("base" = the recipe's start model, or a stage name), prompted and budgeted as
in the collect stage (`collect.history_length`, `max_prompt_tokens`, `max_new_tokens`). ALFWorld: every
split of `eval.splits`; τ²: the test split of every `env.domains` domain. Each evaluation is resumable by itself
(`rwml_jax.evaluation.harness`), so a killed stage continues at the next unfinished episode.

Outputs: `eval/<split>.json` (ALFWorld) or `eval/tau2.json` (+ their .md tables and episode records), and
in DONE.json per evaluation the success mean ± std, invalid-action rate, τ²'s pass^k; plus the world-model
side when the run has triplets: the held-out world-model reward of the evaluated model on triplets/val and
the fraction of its parameters that moved by more than 1e-3 from the start model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from rwml_jax.train.runtime import Runtime
from rwml_jax.train.stage_io import Stage

log = logging.getLogger(__name__)

# Config keys this stage's output depends on, and those that change only its speed.
CONFIG_KEYS: tuple[str, ...] = ("seed", "model", "env.name", "env.data_dir", "env.domains", "env.task_types",
                                "collect.max_prompt_tokens", "collect.max_new_tokens", "collect.history_length",
                                "eval")
IGNORED_KEYS: tuple[str, ...] = ("eval.max_live_episodes",)
MODEL_STAGES = ("warmstart", "rwml", "wm_sft")
EVAL_SEED_OFFSET = 20_011  # generated evaluation games never share a seed with training / warm-start games


def model_stage(config: Any) -> str:
    """"base" or the stage whose `model/` the eval stage plays."""
    e = config.eval
    if e.model:
        return e.model
    stages = list(config.stages)
    before = stages[: stages.index("eval")] if "eval" in stages else stages
    made = [s for s in before if s in MODEL_STAGES]
    return made[-1] if made else "base"


def policy_dir(rt: Runtime) -> str:
    which = model_stage(rt.config)
    if which == "base":
        return rt.policy_source()
    path = rt.work_dir / which / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"eval: the {which!r} stage's model {path} does not exist: run that stage first "
                                f"(or set eval.model)")
    return os.fspath(path)


def _alfworld_data(rt: Runtime, stage: Stage, split: str) -> str | None:
    from rwml_jax.envs.alfworld_gen import generate_games

    c = rt.config
    data = c.eval.data_dir or c.env.data_dir
    if data != "generated":
        return data or None
    root = stage.file("games")
    out = root / split
    if not (out / "generation.json").exists():
        k = list(c.eval.splits).index(split)
        generate_games(os.fspath(out), c.eval.num_generated_games, seed=c.seed + EVAL_SEED_OFFSET + k,
                       task_types=list(c.env.task_types) or None)
    return os.fspath(root)


def run(rt: Runtime, *, force: bool = False) -> dict[str, Any]:
    from rwml_jax.evaluation import tasks as T
    from rwml_jax.evaluation.harness import evaluate
    from rwml_jax.evaluation.policies import model_policy
    from rwml_jax.train.policy import PolicySampler

    c = rt.config
    e = c.eval
    stage = Stage(rt.work_dir, "eval")
    if stage.begin(c, force=force) == "done":
        return stage.read_done().get("summary", {})
    model_dir = policy_dir(rt)
    model_config, params = rt.load_model(model_dir)
    policy = PolicySampler(model_config, rt.tokenizer(), rt.mesh, max_prompt_tokens=c.collect.max_prompt_tokens,
                           max_new_tokens=c.collect.max_new_tokens, weight_format=rt.execution(model_config).weight_format)
    gen = model_policy(policy.generate_fn(params, temperature=e.temperature, top_p=e.top_p, seed=c.seed))
    limit = e.num_tasks if e.num_tasks >= 0 else None
    common = dict(runs=e.runs, seed=c.seed, max_steps=e.max_steps, num_envs=e.max_live_episodes,
                  num_workers=c.env.num_workers, history_length=c.collect.history_length,
                  step_timeout=c.env.step_timeout_s)
    settings = {"policy": model_dir, "model_stage": model_stage(c), "temperature": e.temperature, "top_p": e.top_p}
    evals: dict[str, Any] = {}
    if c.env.name == "alfworld":
        for split in e.splits:
            data = _alfworld_data(rt, stage, split)
            tasks = T.alfworld_tasks(data, split, task_types=list(c.env.task_types) or None, limit=limit)
            res = evaluate(tasks, gen, out=stage.file(f"{split}.json"), env="alfworld", factory=T.ALFWORLD_FACTORY,
                           factory_kwargs={"data_dir": data, "max_steps": e.max_steps},
                           settings={**settings, "split": split}, **common)
            evals[split] = res
    else:
        tasks = T.tau2_tasks(list(c.env.domains), "test", limit=limit)
        res = evaluate(tasks, gen, out=stage.file("tau2.json"), env="tau2", factory=T.TAU2_FACTORY,
                       factory_kwargs={"user": e.user, "max_steps": e.max_steps, "max_messages": 10 * e.max_steps + 20,
                                       "max_errors": 10},
                       settings={**settings, "split": "test", "user": e.user}, **common)
        evals["tau2"] = res
    summary: dict[str, Any] = {"model_stage": model_stage(c), "policy": model_dir}
    for name, res in evals.items():
        o = res["scores"]["overall"]
        summary[name] = {k: o[k] for k in ("success_mean", "success_std", "invalid_action_rate", "mean_steps_success",
                                           "episodes", "crashed", "load_errors")}
        if "pass_hat_k" in o:
            summary[name]["pass_hat_k"] = o["pass_hat_k"]
            summary[name]["invalid_tool_call_rate"] = o["invalid_tool_call_rate"]
    summary["world_model"] = _world_model_side(rt, policy, params, model_dir)
    stage.finish(c, summary=summary, outputs=[f"{n}.json" for n in evals])
    log.info("eval: %s", summary)
    return summary


def _world_model_side(rt: Runtime, policy: Any, params: Any, model_dir: str) -> dict[str, Any]:
    """Held-out world-model reward on triplets/val (when the run has triplets) and the fraction of
    parameters moved by more than 1e-3 from the recipe's start model."""
    from rwml_jax.evaluation.world_model import moved_fraction

    c = rt.config
    out: dict[str, Any] = {}
    start = rt.policy_source()
    if os.path.abspath(start) != os.path.abspath(model_dir):
        out["moved_fraction"] = moved_fraction(start, model_dir)
        out["start"] = start
    if (rt.work_dir / "triplets" / "val.jsonl").exists():
        from rwml_jax.train.stages.triplets import load_split
        from rwml_jax.train.wm_eval import evaluate as wm_evaluate, reward_config

        val = load_split(rt, "val")
        if c.rwml.eval_size >= 0:
            val = val[: c.rwml.eval_size]
        if val:
            res = wm_evaluate(policy, params, val, rt.embedder, reward_config(c), samples=c.rwml.eval_samples,
                              temperature=c.rwml.eval_temperature, seed=c.seed)
            res.pop("examples", None)
            out["heldout_reward"] = res["mean_reward"]
            out["heldout_triplets"] = res["n"]
    return out
