"""Stage `eval`: agent success of the recipe's models, scored by the evaluation harness.

The policies are the models named in `eval.models` ("base" = the recipe's start model, or a model stage:
warmstart, rwml, wm_sft, policy_rl or an instance policy_rl@<init>; e.g. ("warmstart", "rwml") for before / after), by default the model of the last
model-producing stage before `eval` in `stages`; each is prompted and budgeted as in the collect stage
(`collect.history_length`, `max_prompt_tokens`, `max_new_tokens`) and plays the same games or tasks:
ALFWorld every split of `eval.splits`, τ² the test split of every `env.domains` domain. Each evaluation is
resumable by itself (`rwml_jax.evaluation.harness`), so a killed stage continues at the next unfinished episode.

Outputs: `eval/<model>/<split>.json` (ALFWorld) or `eval/<model>/tau2.json` (+ their .md tables and episode
records), `eval/compare.md` (the models side by side, `rwml-jax compare`'s table), and in DONE.json per model
and evaluation the success mean ± std, invalid-action rate, τ²'s pass^k; plus each model's world-model side
when the run has triplets: its held-out world-model reward on triplets/val and the fraction of its parameters
that moved by more than 1e-3 from the start model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from rwml_jax.config.stages import is_model_stage
from rwml_jax.envs.alfworld_gen import generate_games
from rwml_jax.evaluation import tasks as T
from rwml_jax.evaluation.compare import compare_table, load_rows
from rwml_jax.evaluation.harness import evaluate
from rwml_jax.evaluation.policies import model_policy
from rwml_jax.evaluation.world_model import moved_fraction
from rwml_jax.train.policy import PolicySampler
from rwml_jax.train.runtime import Runtime
from rwml_jax.train.stage_io import Stage, atomic_write_text
from rwml_jax.train.stages.rwml import eval_subset
from rwml_jax.train.wm_eval import evaluate as wm_evaluate
from rwml_jax.train.wm_eval import reward_config

log = logging.getLogger(__name__)

# Config keys this stage's output depends on, and those that change only its speed.
CONFIG_KEYS: tuple[str, ...] = ("seed", "model", "env.name", "env.data_dir", "env.domains", "env.task_types",
                                "collect.max_prompt_tokens", "collect.max_new_tokens", "collect.history_length",
                                "eval")
IGNORED_KEYS: tuple[str, ...] = ("eval.max_live_episodes",)
EVAL_SEED_OFFSET = 20_011  # generated evaluation games never share a seed with training / warm-start games


def model_stages(config: Any) -> tuple[str, ...]:
    """The models the eval stage plays: "base" or stages whose `model/` it loads."""
    if config.eval.models:
        return tuple(config.eval.models)
    stages = list(config.stages)
    before = stages[: stages.index("eval")] if "eval" in stages else stages
    made = [s for s in before if is_model_stage(s)]
    return (made[-1] if made else "base",)


def policy_dir(rt: Runtime, which: str) -> str:
    """The model folder of `which`: "base" = the recipe's start model, else `<work_dir>/<which>/model`."""
    if which == "base":
        return rt.policy_source()
    path = rt.work_dir / which / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the {which!r} stage's model {path} does not exist: run that stage first "
                                f"(or set eval.models / policy_rl.init)")
    return os.fspath(path)


def alfworld_eval_data(rt: Runtime, stage: Stage, split: str) -> str | None:
    """The ALFWorld data folder of evaluation split `split` (generated games: made once into
    `<stage>/games/<split>` with the eval seeds, the same games in every stage that evaluates)."""
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
    c = rt.config
    stage = Stage(rt.work_dir, "eval")
    if stage.begin(c, force=force) == "done":
        return stage.read_done().get("summary", {})
    summary: dict[str, Any] = {"models": {}}
    outputs = []
    for which in model_stages(c):
        summary["models"][which], files = _evaluate_model(rt, stage, which)
        outputs += files
    table = compare_table(load_rows([f"{which}={stage.file(which)}" for which in model_stages(c)]))
    atomic_write_text(stage.file("compare.md"), table + "\n")
    summary["compare"] = table
    stage.finish(c, summary=summary, outputs=[*outputs, "compare.md"])
    log.info("eval:\n%s", table)
    return summary


def _evaluate_model(rt: Runtime, stage: Stage, which: str) -> tuple[dict[str, Any], list[str]]:
    """Play `which`'s model on every split / domain; (its summary, its output files in the stage folder)."""
    c, e = rt.config, rt.config.eval
    model_dir = policy_dir(rt, which)
    model_config, params = rt.load_model(model_dir)
    policy = PolicySampler(model_config, rt.tokenizer(), rt.mesh, max_prompt_tokens=c.collect.max_prompt_tokens,
                           max_new_tokens=c.collect.max_new_tokens, weight_format=rt.execution(model_config).weight_format)
    gen = model_policy(policy.generate_fn(params, temperature=e.temperature, top_p=e.top_p, seed=c.seed))
    settings = {"policy": model_dir, "model_stage": which, "temperature": e.temperature, "top_p": e.top_p}
    evals = play(rt, stage, gen, which, limit=e.num_tasks if e.num_tasks >= 0 else None, runs=e.runs,
                 settings=settings)
    summary: dict[str, Any] = {"policy": model_dir}
    for name, res in evals.items():
        o = res["scores"]["overall"]
        summary[name] = {k: o[k] for k in ("success_mean", "success_std", "invalid_action_rate", "mean_steps_success",
                                           "episodes", "crashed", "load_errors")}
        if "pass_hat_k" in o:
            summary[name]["pass_hat_k"] = o["pass_hat_k"]
            summary[name]["invalid_tool_call_rate"] = o["invalid_tool_call_rate"]
    summary["world_model"] = _world_model_side(rt, policy, params, model_dir)
    return summary, [f"{which}/{n}.json" for n in evals]


def play(rt: Runtime, stage: Stage, gen: Any, prefix: str, *, limit: int | None, runs: int,
         settings: dict[str, Any], splits: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Play the rollout policy `gen` on the recipe's held-out tasks through the evaluation harness:
    ALFWorld every split of `splits` (default `eval.splits`), τ² the test split of every `env.domains`
    domain; the first `limit` tasks (None = all), `runs` runs, at most `eval.max_steps` steps. Results go
    to `<stage>/<prefix>/<split>.json` (resumable); returns {split or "tau2": the harness's result}."""
    c, e = rt.config, rt.config.eval
    common = dict(runs=runs, seed=c.seed, max_steps=e.max_steps, num_envs=e.max_live_episodes,
                  num_workers=c.env.num_workers, history_length=c.collect.history_length,
                  step_timeout=c.env.step_timeout_s)
    evals: dict[str, Any] = {}
    if c.env.name == "alfworld":
        for split in splits or e.splits:
            data = alfworld_eval_data(rt, stage, split)
            tasks = T.alfworld_tasks(data, split, task_types=list(c.env.task_types) or None, limit=limit)
            evals[split] = evaluate(tasks, gen, out=stage.file(f"{prefix}/{split}.json"), env="alfworld",
                                    factory=T.ALFWORLD_FACTORY, factory_kwargs={"data_dir": data, "max_steps": e.max_steps},
                                    settings={**settings, "split": split}, **common)
    else:
        tasks = T.tau2_tasks(list(c.env.domains), "test", limit=limit)
        evals["tau2"] = evaluate(tasks, gen, out=stage.file(f"{prefix}/tau2.json"), env="tau2", factory=T.TAU2_FACTORY,
                                 factory_kwargs={"user": e.user, "max_steps": e.max_steps,
                                                 "max_messages": 10 * e.max_steps + 20, "max_errors": 10},
                                 settings={**settings, "split": "test", "user": e.user}, **common)
    return evals


def _world_model_side(rt: Runtime, policy: Any, params: Any, model_dir: str) -> dict[str, Any]:
    """Held-out world-model reward on triplets/val (when the run has triplets) and the fraction of
    parameters moved by more than 1e-3 from the recipe's start model."""
    c = rt.config
    out: dict[str, Any] = {}
    start = rt.policy_source()
    if os.path.abspath(start) != os.path.abspath(model_dir):
        out["moved_fraction"] = moved_fraction(start, model_dir)
        out["start"] = start
    if (rt.work_dir / "triplets" / "val.jsonl").exists():
        val = eval_subset(rt, c.rwml.eval_size)  # the rwml stage's held-out subset
        if val:
            res = wm_evaluate(policy, params, val, rt.embedder, reward_config(c), samples=c.rwml.eval_samples,
                              temperature=c.rwml.eval_temperature, seed=c.seed)
            res.pop("examples", None)
            out["heldout_reward"] = res["mean_reward"]
            out["heldout_triplets"] = res["n"]
    return out
