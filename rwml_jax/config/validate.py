"""Validation of a loaded config: one small validator per section, with the allowed values of each field
imported from the module that acts on them.

Types are already enforced by ml_collections (a locked ConfigDict refuses a value of another type);
these check choices and ranges, and the few rules that tie fields together. A section a recipe leaves
out is not required here (the stage that needs it fails when it reads it). All problems found are
reported together in one `ConfigError`.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import Any

from rwml_jax.config.keys import ConfigDict, ConfigError, get_path, has_path
from rwml_jax.config.recipes import import_configs_module
from rwml_jax.config.stages import POLICY_RL_INITS, STAGE_ORDER, is_model_stage, is_stage, stage_kind
from rwml_jax.envs import ENV_NAMES, TAU2_DOMAINS
from rwml_jax.envs.alfworld_data import SPLITS as ALFWORLD_SPLITS
from rwml_jax.envs.alfworld_data import TASK_TYPES as ALFWORLD_TASK_TYPES
from rwml_jax.envs.user_spec import parse_user_spec
from rwml_jax.platform import ATTENTION_KERNELS, DTYPES, LAYER_LOOPS, REMAT_POLICIES, WEIGHT_FORMATS
from rwml_jax.rl.grpo_options import KL_ESTIMATORS, LOSS_AGGS
from rwml_jax.rl.train_state import SCHEDULES
from rwml_jax.rwml.rewards import REWARD_KINDS
from rwml_jax.storage import StorageError, check_location


class Section:
    """One section of the config under validation (``""`` = the top level); failures are collected."""

    def __init__(self, config: ConfigDict, name: str, errors: list[str]) -> None:
        self.root, self.name, self.errors = config, name, errors

    def key(self, field: str) -> str:
        return f"{self.name}.{field}" if self.name else field

    def has(self, field: str) -> bool:
        return has_path(self.root, self.key(field))

    def get(self, field: str) -> Any:
        return get_path(self.root, self.key(field))

    def typed(self, field: str, kind: type | tuple[type, ...]) -> Any:
        """The field's value when present and of `kind`, else None (for rules that combine fields)."""
        v = self.get(field) if self.has(field) else None
        return v if isinstance(v, kind) and not isinstance(v, bool) else None

    def fail(self, field: str, msg: str) -> None:
        self.errors.append(f"{self.key(field)}={self.get(field)!r}: {msg}")

    def one_of(self, field: str, allowed: Sequence[Any]) -> None:
        if self.has(field) and self.get(field) not in allowed:
            self.fail(field, f"expected one of {', '.join(map(repr, allowed))}")

    def subset(self, field: str, allowed: Sequence[Any]) -> None:
        if not self.has(field):
            return
        if not isinstance(self.get(field), (tuple, list)):
            self.fail(field, "expected a tuple")
            return
        bad = [x for x in self.get(field) if x not in allowed]
        if bad:
            self.fail(field, f"unknown value(s) {bad}; allowed: {', '.join(map(repr, allowed))}")

    def number(self, field: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               hi_open: bool = False, allow: Sequence[Any] = (), integer: bool = False) -> None:
        if not self.has(field):
            return
        v = self.get(field)
        if v in allow and not isinstance(v, bool):
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            self.fail(field, "expected an int" if integer else "expected a number")
            return
        if not math.isfinite(v):
            self.fail(field, "must be finite")
            return
        ok = (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            lo_s = "(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo}"
            hi_s = "inf)" if hi is None else f"{hi}" + (")" if hi_open else "]")
            self.fail(field, f"must be in {lo_s}, {hi_s}" + (f" or one of {list(allow)}" if allow else ""))

    def positive_int(self, field: str, allow: Sequence[int] = ()) -> None:
        self.number(field, lo=1, allow=allow, integer=True)

    def nonneg_int(self, field: str) -> None:
        self.number(field, lo=0, integer=True)

    def prob(self, field: str) -> None:
        self.number(field, lo=0.0, hi=1.0)

    def distance(self, field: str) -> None:
        """A cosine-distance threshold: d = 1 - cos lies in [0, 2]."""
        self.number(field, lo=0.0, hi=2.0, lo_open=True)

    def nonempty_str(self, field: str) -> None:
        if self.has(field) and (not isinstance(self.get(field), str) or not self.get(field).strip()):
            self.fail(field, "must be a non-empty string")

    def divides(self, field: str, total: int, what: str) -> None:
        if self.has(field):
            m = self.get(field)
            if isinstance(m, int) and m > 0 and total % m:
                self.fail(field, f"must divide {what} ({total})")


# ------------------------------------------------------------------------------------------------
# One validator per section
# ------------------------------------------------------------------------------------------------
def _run(s: Section) -> None:
    """Top level: name, work_dir, seed and the stages to run."""
    s.nonempty_str("name")
    s.nonempty_str("work_dir")
    _location(s, "work_dir")
    s.number("seed", lo=0, integer=True)
    st = list(s.typed("stages", (tuple, list)) or ())
    bad = [x for x in st if not isinstance(x, str) or not is_stage(x)]
    if bad:
        s.fail("stages", f"unknown value(s) {bad}; allowed: {', '.join(STAGE_ORDER)} (policy_rl also as "
                         f"policy_rl@<init>, init one of {', '.join(POLICY_RL_INITS)})")
    else:
        if len(set(st)) != len(st):
            s.fail("stages", "lists a stage twice")
        elif st != sorted(st, key=lambda x: STAGE_ORDER.index(stage_kind(x))):
            s.fail("stages", f"stages must follow the pipeline order {STAGE_ORDER}")
        for x in st:  # a policy_rl arm needs its start model's stage in the run (or a finished one on disk)
            init = x.split("@", 1)[1] if "@" in x else None
            if init not in (None, "base") and init not in STAGE_ORDER:
                s.fail("stages", f"{x}: no stage {init!r} in this version (stages: {', '.join(STAGE_ORDER)})")


def _model(s: Section) -> None:
    s.one_of("dtype", DTYPES)
    s.one_of("compute_dtype", DTYPES)
    if s.has("path") and s.has("preset") and not s.get("path") and not s.get("preset"):
        s.fail("path", "set model.path (HF folder or hub name) or model.preset (random init)")
    name = s.typed("preset", str)
    if name:
        presets = _presets()
        if presets is not None and name not in presets:
            hint = difflib.get_close_matches(str(name), list(presets), n=1)
            s.fail("preset", (f"did you mean {hint[0]!r}? " if hint else "")
                   + f"available shape presets: {', '.join(presets)}")


def _presets() -> dict[str, Any] | None:
    try:
        return import_configs_module("models").PRESETS
    except ConfigError:  # no configs/ folder (a recipe file from elsewhere): presets unknown here
        return None


def _execution(s: Section) -> None:
    s.one_of("remat", REMAT_POLICIES)
    s.one_of("layer_loop", LAYER_LOOPS)
    s.one_of("weight_format", WEIGHT_FORMATS)
    s.one_of("attention", ATTENTION_KERNELS)
    if s.typed("compilation_cache", str) not in (None, "", "auto"):
        _location(s, "compilation_cache")


def _location(s: Section, field: str) -> None:
    """A local path, or a URL whose scheme a backend installed here serves (`rwml_jax.storage`)."""
    if s.typed(field, str):
        try:
            check_location(s.get(field), s.key(field))
        except StorageError as e:
            s.errors.append(str(e))


def _embedder(s: Section) -> None:
    s.nonempty_str("path")
    s.positive_int("batch_size")
    s.positive_int("max_length")
    s.one_of("dtype", DTYPES)


def _mesh(s: Section) -> None:
    axes = list(get_path(s.root, "mesh"))  # the section's fields are the mesh axes (data, fsdp, tensor)
    for ax in axes:
        s.positive_int(ax, allow=(-1,))
    if [s.get(a) for a in axes].count(-1) > 1:
        s.fail(axes[0], f"at most one of {' / '.join(f'mesh.{a}' for a in axes)} may be -1")


def _env(s: Section) -> None:
    s.one_of("name", ENV_NAMES)
    s.positive_int("max_steps")
    s.nonneg_int("num_workers")
    s.number("step_timeout_s", lo=0, lo_open=True)
    s.nonneg_int("num_generated_games")
    if s.typed("data_dir", str) == "generated" and s.typed("num_generated_games", int) == 0:
        s.fail("num_generated_games", "env.data_dir='generated' needs a number of games to generate")
    s.subset("domains", TAU2_DOMAINS)
    s.subset("task_types", ALFWORLD_TASK_TYPES)
    name = s.typed("name", str)
    if name == "alfworld":
        s.one_of("split", ALFWORLD_SPLITS)
    if name == "tau2":
        if s.has("domains") and not s.get("domains"):
            s.fail("domains", "τ² needs at least one domain")
        for field in ("user", "user_alt"):
            if not s.has(field) or (field == "user_alt" and s.get(field) == ""):
                continue
            _user_spec(s, field)
        s.prob("user_mix")
        s.number("user_temperature", lo=0.0)
        s.positive_int("user_max_new_tokens")
        s.positive_int("user_max_prompt_tokens")
        if s.typed("user_alt", str) and s.typed("user_alt", str) == s.typed("user", str):
            s.fail("user_alt", "is the same simulator as env.user (the mix needs two)")


def _user_spec(s: Section, field: str) -> None:
    """A τ² user-simulator spec (rwml_jax.envs.user_spec)."""
    try:
        parse_user_spec(s.get(field))
    except ValueError as e:
        s.fail(field, str(e))


def _sampling(s: Section, *, greedy_ok: bool = True) -> None:
    """temperature / top_p / max_new_tokens of a section that samples (temperature 0 = greedy)."""
    s.number("temperature", lo=0.0, lo_open=not greedy_ok)
    s.number("top_p", lo=0.0, hi=1.0, lo_open=True)
    s.positive_int("max_new_tokens")


def _collect(s: Section) -> None:
    s.positive_int("num_tasks", allow=(-1,))
    s.positive_int("trajectories_per_task")
    _sampling(s)
    s.positive_int("max_prompt_tokens")
    s.nonneg_int("history_length")
    s.positive_int("max_live_episodes")


def _triplets(s: Section) -> None:
    s.nonneg_int("history_length")
    s.number("val_fraction", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    s.number("seed", lo=0, integer=True)
    s.one_of("split_by", ("triplet", "task"))
    env = Section(s.root, "env", [])
    if s.has("ask_task_status") and s.get("ask_task_status") is True and env.has("name") and env.get("name") != "tau2":
        s.fail("ask_task_status", "only τ² world-model prompts ask for a task status (env.name='tau2')")


def _filter(s: Section) -> None:
    s.positive_int("num_samples")
    s.distance("threshold_observation")
    s.distance("threshold_user_reply")
    s.prob("tau_easy")
    s.prob("keep_easy_prob")
    _sampling(s)
    s.positive_int("batch_prompts")


def _rewards(s: Section) -> None:
    s.one_of("kind", REWARD_KINDS)
    s.distance("threshold_observation")
    s.distance("threshold_user_reply")
    s.number("rouge_grid", lo=0.0, hi=1.0, lo_open=True)
    s.nonneg_int("prediction_max_tokens")
    s.number("think_penalty", lo=0.0)
    s.nonneg_int("think_min_tokens")
    s.number("status_penalty", lo=0.0)
    s.prob("judge_threshold")
    s.number("judge_temperature", lo=0.0)
    s.positive_int("judge_max_new_tokens")
    root = Section(s.root, "", [])
    if s.typed("status_penalty", (int, float)) and not (root.has("triplets.ask_task_status")
                                                         and root.get("triplets.ask_task_status")):
        s.fail("status_penalty", "scores a task-status line the world model is only asked for with "
                                 "triplets.ask_task_status=True")
    judge = s.typed("judge", str) or ""
    if s.typed("kind", str) == "judge":
        if not judge.startswith(("local:", "litellm:")) or not judge.split(":", 1)[1].strip():
            s.fail("judge", "rewards.kind='judge' needs a judge: 'local:<hf folder or preset>' or 'litellm:<model>'")
    elif judge:
        s.fail("judge", "is set but rewards.kind is not 'judge': set rewards.kind=judge or leave it empty")


def _grpo(s: Section) -> None:
    """What the GRPO stages (rwml, policy_rl) share: optimiser, loss options, sampling, held-out evaluation."""
    s.number("learning_rate", lo=0.0, lo_open=True)
    s.number("group_size", lo=2, integer=True)
    s.number("kl_coef", lo=0.0)
    s.one_of("kl_estimator", KL_ESTIMATORS)
    s.number("clip_eps_low", lo=0.0, hi=1.0)
    s.number("clip_eps_high", lo=0.0)
    s.one_of("loss_agg", LOSS_AGGS)
    s.number("router_aux_loss_coef", lo=0.0)
    _sampling(s, greedy_ok=False)
    s.positive_int("max_prompt_tokens")
    s.positive_int("micro_batch_size")
    s.nonneg_int("warmup_steps")
    s.number("max_grad_norm", lo=0.0, lo_open=True)
    s.number("weight_decay", lo=0.0)
    s.positive_int("eval_every")
    s.positive_int("eval_size", allow=(-1,))
    s.number("eval_temperature", lo=0.0)


def _rwml(s: Section) -> None:
    _grpo(s)
    s.positive_int("epochs")
    s.positive_int("batch_prompts")
    s.positive_int("max_steps", allow=(-1,))
    s.positive_int("eval_samples")
    bp, g = s.typed("batch_prompts", int), s.typed("group_size", int)
    if bp and g and bp > 0 and g > 0:
        s.divides("micro_batch_size", bp * g, "rwml.batch_prompts x rwml.group_size sequences")


def _policy_rl(s: Section) -> None:
    """The `policy_rl` stage (rwml_jax/train/stages/policy_rl.py)."""
    s.one_of("init", POLICY_RL_INITS)
    init = s.typed("init", str)
    if init and init != "base" and init not in STAGE_ORDER:
        s.fail("init", f"no stage {init!r} in this version (stages: {', '.join(STAGE_ORDER)})")
    _grpo(s)
    s.positive_int("steps")
    s.positive_int("batch_tasks")
    s.positive_int("max_episode_steps")
    s.positive_int("num_tasks", allow=(-1,))
    s.positive_int("eval_runs")
    s.positive_int("max_live_episodes")


def _sft(s: Section) -> None:
    """An SFT run's optimiser settings (filter.sft, wm_sft, expert_sft, warmstart)."""
    s.number("learning_rate", lo=0.0, lo_open=True)
    s.positive_int("epochs")
    s.positive_int("batch_size")
    s.positive_int("micro_batch_size")
    s.nonneg_int("warmup_steps")
    batch = s.typed("batch_size", int)
    if batch and batch > 0:
        s.divides("micro_batch_size", batch, f"{s.name}.batch_size")


def _expert_sft(s: Section) -> None:
    _sft(s)
    s.positive_int("steps", allow=(-1,))


def _warmstart(s: Section) -> None:
    _sft(s)
    s.positive_int("steps", allow=(-1,))
    s.nonneg_int("num_games")
    s.one_of("corpus", ("walkthrough", "explorer"))
    s.positive_int("seq_len")
    s.positive_int("tokenizer_vocab_size")
    s.one_of("schedule", SCHEDULES)
    s.positive_int("policy_repeat")
    s.nonneg_int("dagger_rounds")
    s.nonneg_int("dagger_steps")
    if (s.typed("dagger_rounds", int) or 0) > 0:
        if s.get("corpus") != "explorer":
            s.fail("dagger_rounds", "DAgger labels the student's states with the explorer: needs corpus='explorer'")
        if not s.typed("dagger_steps", int):
            s.fail("dagger_steps", "must be >= 1 when dagger_rounds > 0")
    elif (s.typed("dagger_steps", int) or 0) > 0:
        s.fail("dagger_steps", "has no effect without dagger_rounds > 0")
    preset = Section(s.root, "model", []).typed("preset", str)
    presets = _presets() if preset else None
    vocab_size = s.typed("tokenizer_vocab_size", int)
    if presets and preset in presets and vocab_size and "warmstart" in (s.root.get("stages") or ()):
        vocab = presets[preset]["vocab_size"]
        if vocab_size > vocab:
            s.fail("tokenizer_vocab_size", f"exceeds the vocabulary of preset {preset!r} ({vocab})")


def _optimizer(s: Section) -> None:
    s.prob("b1")
    s.prob("b2")
    s.number("eps", lo=0.0, lo_open=True)
    s.one_of("state_dtype", ("float32", "bfloat16"))


def _checkpoint(s: Section) -> None:
    s.positive_int("every_steps")
    s.positive_int("keep")


# logging.wandb_mode: what wandb.init(mode=...) takes ("" = wandb's own choice: $WANDB_MODE, else online)
WANDB_MODES: tuple[str, ...] = ("", "online", "offline", "disabled")


def _logging(s: Section) -> None:
    """`MetricsLogger`'s writers (rwml_jax/train/metrics_log.py, rwml_jax/train/writers.py)."""
    s.positive_int("log_every")
    s.nonneg_int("num_sample_texts")
    s.one_of("wandb_mode", WANDB_MODES)
    set_keys = [k for k in ("wandb_project", "wandb_entity", "wandb_mode", "wandb_group") if s.has(k) and s.get(k)]
    if not (s.has("wandb") and s.get("wandb")):
        for k in set_keys:
            s.fail(k, "is set but logging.wandb is False: set logging.wandb=True to log to Weights & Biases, "
                      "or leave it empty")
    elif importlib.util.find_spec("wandb") is None:
        s.fail("wandb", "the wandb package is not installed: pip install 'rwml-jax[wandb]' (or wandb), "
                        "or set logging.wandb=False")


def _eval(s: Section) -> None:
    """The `eval` stage (rwml_jax/train/stages/eval.py)."""
    s.subset("splits", ALFWORLD_SPLITS)
    if s.has("splits") and not s.get("splits"):
        s.fail("splits", "must name at least one ALFWorld split")
    s.positive_int("max_steps")
    s.positive_int("runs")
    s.number("temperature", lo=0.0)
    s.number("top_p", lo=0.0, hi=1.0, lo_open=True)
    s.positive_int("num_tasks", allow=(-1,))
    s.nonneg_int("num_generated_games")
    s.positive_int("max_live_episodes")
    models = s.typed("models", (tuple, list)) or ()
    bad = [m for m in models if m != "base" and not is_model_stage(m)]
    if bad:
        s.fail("models", f"unknown model(s) {bad}: expected 'base' or a model stage (warmstart, rwml, wm_sft, "
                         "policy_rl or an instance policy_rl@<init>)")
    models = s.typed("models", (tuple, list)) or ()
    if len(set(models)) != len(models):
        s.fail("models", "lists a model twice")
    if s.has("user"):
        _user_spec(s, "user")
    root = Section(s.root, "", s.errors)
    data_dir = s.get("data_dir") if s.has("data_dir") else ""
    generated = data_dir == "generated" or (data_dir == "" and root.has("env.data_dir")
                                            and root.get("env.data_dir") == "generated")
    stages = root.get("stages") if root.has("stages") else ()
    if ("eval" in stages and root.has("env.name") and root.get("env.name") == "alfworld" and generated
            and s.has("num_generated_games") and s.get("num_generated_games") < 1):
        s.fail("num_generated_games", "must be >= 1 when the evaluation games are generated")


# section -> its validator ("" = the top level)
VALIDATORS: dict[str, Callable[[Section], None]] = {
    "": _run, "model": _model, "execution": _execution, "embedder": _embedder, "mesh": _mesh, "env": _env,
    "collect": _collect, "triplets": _triplets, "filter": _filter, "filter.sft": _sft, "rewards": _rewards,
    "rwml": _rwml, "policy_rl": _policy_rl, "wm_sft": _sft, "expert_sft": _expert_sft, "warmstart": _warmstart,
    "optimizer": _optimizer,
    "checkpoint": _checkpoint, "logging": _logging, "eval": _eval,
}


def validate_config(config: ConfigDict) -> None:
    """Run the validator of every section the config has; raises ConfigError listing all problems."""
    errors: list[str] = []
    for name, check in VALIDATORS.items():
        if not name or has_path(config, name):
            check(Section(config, name, errors))
    if errors:
        raise ConfigError(f"invalid config {config.get('name', '?')!r}:\n  " + "\n  ".join(errors))
