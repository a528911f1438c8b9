"""Recipe configs: loading, command-line overrides, validation and provenance.

A recipe is a Python file exposing ``get_config()`` (or ``get_config(arg)``) that returns an
``ml_collections.ConfigDict``; the project's recipes live in the repository's ``configs/`` folder
(``configs/rwml_alfworld.py``, ``configs/rwml_tau2.py``, ``configs/demo_cpu.py``), and their shared
defaults, with one comment per field, in ``configs/base.py``.

    config = load_config("rwml_alfworld", ["--config.rwml.learning_rate=2e-6"])
    config = load_config("path/to/my_recipe.py:fast", ["--config.seed", "3"])

Everything that can be checked without doing work is checked in `load_config`: an unknown or mistyped
key raises `ConfigError` naming the closest valid key, a value that does not parse as the field's type or
is out of range raises `ConfigError` naming the field and what it accepts. The returned config is locked
(no new keys; values may still be assigned, type-checked by ml_collections).
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import math
import os
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict

# Pipeline stages in the order `rwml-jax run` executes them.
STAGE_ORDER: tuple[str, ...] = ("warmstart", "collect", "triplets", "filter", "rwml", "wm_sft", "eval")
ENV_NAMES = ("alfworld", "tau2")
TAU2_DOMAINS = ("airline", "retail", "telecom")
ALFWORLD_TASK_TYPES = (  # = rwml_jax.envs.alfworld_data.TASK_TYPES (kept here so configs load without alfworld)
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
ALFWORLD_SPLITS = ("train", "valid_seen", "valid_unseen")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
LAYER_LOOPS = ("auto", "scan", "unroll")  # = rwml_jax.models.config.LAYER_LOOPS (a test keeps them equal)
KL_ESTIMATORS = ("k1", "k3")  # = rwml_jax.rl.grpo.KL_ESTIMATORS (a test keeps them equal)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")  # = rwml_jax.rl.grpo.LOSS_AGGS
REWARD_KINDS = ("embedding", "judge", "judge_binary")

CONFIGS_DIR_ENV = "RWML_CONFIGS_DIR"
_OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
    """A recipe could not be found, or a key or value in it (or in an override) is invalid."""


# ------------------------------------------------------------------------------------------------
# Finding recipes
# ------------------------------------------------------------------------------------------------
def configs_dir() -> Path | None:
    """The recipe folder: $RWML_CONFIGS_DIR, else the repository's configs/ (next to the package), else
    ./configs in the current directory. None when none of them exists."""
    candidates: list[Path] = []
    if os.environ.get(CONFIGS_DIR_ENV):
        candidates.append(Path(os.environ[CONFIGS_DIR_ENV]))
    candidates.append(Path(__file__).resolve().parent.parent / "configs")
    candidates.append(Path.cwd() / "configs")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None


def available_recipes() -> list[str]:
    """Names of the recipe files (those defining get_config) in `configs_dir()`."""
    d = configs_dir()
    if d is None:
        return []
    out = []
    for p in sorted(d.glob("*.py")):
        if p.stem.startswith("_") or p.stem in ("base", "models"):
            continue
        out.append(p.stem)
    return out


def _ensure_configs_package(folder: Path) -> None:
    """Make ``import configs.base`` work for recipes however rwml-jax was installed."""
    mod = sys.modules.get("configs")
    if mod is not None:
        paths = [str(Path(p).resolve()) for p in getattr(mod, "__path__", [])]
        if str(folder) in paths:
            return
        if paths:  # some other `configs` package is imported: put ours in front of its search path
            mod.__path__.insert(0, str(folder))  # type: ignore[attr-defined]
            return
    init = folder / "__init__.py"
    if init.exists():
        spec = importlib.util.spec_from_file_location("configs", init, submodule_search_locations=[str(folder)])
        assert spec and spec.loader
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["configs"] = pkg
        spec.loader.exec_module(pkg)
    else:
        pkg = types.ModuleType("configs")
        pkg.__path__ = [str(folder)]  # type: ignore[attr-defined]
        sys.modules["configs"] = pkg


def import_configs_module(name: str) -> types.ModuleType:
    """Import ``configs.<name>`` (e.g. "models", "base") from `configs_dir()`."""
    d = configs_dir()
    if d is None:
        raise ConfigError(f"cannot find the configs/ folder (looked next to the rwml_jax package and in "
                          f"{Path.cwd()}); set ${CONFIGS_DIR_ENV} to the folder holding the recipes")
    _ensure_configs_package(d)
    return importlib.import_module(f"configs.{name}")


def resolve_config_path(path_or_name: str) -> tuple[Path, str | None]:
    """``"name"``, ``"name:arg"``, ``"path.py"`` or ``"path.py:arg"`` -> (file, arg or None)."""
    spec, arg = path_or_name, None
    # split off ":arg" (but not a Windows drive letter "C:\...")
    head, sep, tail = path_or_name.rpartition(":")
    if sep and head and not (len(head) == 1 and tail.startswith(("\\", "/"))):
        spec, arg = head, tail
    p = Path(spec).expanduser()
    d = configs_dir()
    if p.suffix == ".py" or os.sep in spec or "/" in spec:
        if p.is_file():
            return p.resolve(), arg
        if d is not None and p.parent == Path(".") and (d / p.name).is_file():  # "demo_cpu.py"
            return (d / p.name).resolve(), arg
        raise ConfigError(f"config file {spec!r} does not exist")
    if d is not None and (d / f"{spec}.py").is_file():
        return (d / f"{spec}.py").resolve(), arg
    names = available_recipes()
    hint = difflib.get_close_matches(spec, names, n=1)
    msg = f"unknown recipe {spec!r}"
    if hint:
        msg += f"; did you mean {hint[0]!r}?"
    msg += f" (recipes in {d}: {', '.join(names) or 'none'})" if d else " (no configs/ folder found)"
    raise ConfigError(msg)


def _load_module(path: Path) -> types.ModuleType:
    folder = configs_dir()
    if folder is not None:
        _ensure_configs_package(folder)
    if folder is not None and path.parent == folder:
        return importlib.import_module(f"configs.{path.stem}")
    name = f"_rwml_recipe_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------
# Flat views
# ------------------------------------------------------------------------------------------------
def flatten(config: ConfigDict | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"rwml.learning_rate": 1e-6, ...}: every leaf under its dotted key (sections are not leaves)."""
    out: dict[str, Any] = {}
    items = config.items()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (ConfigDict, Mapping)):
            sub = flatten(v, key + ".")
            out.update(sub)
        else:
            out[key] = v
    return out


def _sections(config: ConfigDict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in config.items():
        if isinstance(v, ConfigDict):
            out.add(f"{prefix}{k}")
            out |= _sections(v, f"{prefix}{k}.")
    return out


def suggest_key(key: str, valid: Iterable[str]) -> str | None:
    """The valid dotted key closest to `key` (difflib over full keys, then over last components)."""
    valid = list(valid)
    hit = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if hit:
        return hit[0]
    last = key.rsplit(".", 1)[-1]
    by_last: dict[str, list[str]] = {}
    for v in valid:
        by_last.setdefault(v.rsplit(".", 1)[-1], []).append(v)
    hit = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.7)
    return by_last[hit[0]][0] if hit else None


def _unknown_key_error(key: str, config: ConfigDict) -> ConfigError:
    valid = list(flatten(config))
    hint = suggest_key(key, valid)
    msg = f"unknown config key {key!r}"
    if hint:
        msg += f"; did you mean {hint!r}?"
    else:
        section = key.split(".")[0]
        same = [v for v in valid if v.startswith(section + ".")]
        if same:
            msg += f" (keys under {section!r}: {', '.join(same)})"
    return ConfigError(msg)


def get_path(config: ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            raise _unknown_key_error(key, config)
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------------
# Overrides
# ------------------------------------------------------------------------------------------------
def parse_override_args(args: Sequence[str]) -> list[tuple[str, str | None]]:
    """``["--config.a.b=1", "--config.c", "x", "--config.flag"]`` -> ``[("a.b","1"), ("c","x"), ("flag",None)]``.

    A value of None means the flag was given alone (allowed for bool fields: sets True). Anything that is
    not a ``--config.KEY`` argument raises ConfigError.
    """
    out: list[tuple[str, str | None]] = []
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith(_OVERRIDE_PREFIX):
            raise ConfigError(f"unrecognized argument {a!r}: config overrides look like "
                              f"--config.section.key=value (or --config.section.key value)")
        body = a[len(_OVERRIDE_PREFIX):]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 2
        else:
            key, value = body, None
            i += 1
        if not key:
            raise ConfigError(f"empty config key in {a!r}")
        out.append((key, value))
    return out


_TRUE = ("true", "1", "yes", "on", "t", "y")
_FALSE = ("false", "0", "no", "off", "f", "n")
_NONE = ("none", "null")


def _strip_quotes(s: str) -> str:
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


def _coerce_scalar(key: str, raw: str, kind: type) -> Any:
    s = raw.strip()
    if kind is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ConfigError(f"config key {key!r} is a bool; got {raw!r} (use true/false)")
    if kind is int:
        try:
            return int(s.replace("_", ""))
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                f = math.nan
            if math.isfinite(f) and f == int(f):
                return int(f)
            raise ConfigError(f"config key {key!r} is an int; got {raw!r}") from None
    if kind is float:
        try:
            return float(s)
        except ValueError:
            raise ConfigError(f"config key {key!r} is a float; got {raw!r}") from None
    if kind is str:
        return _strip_quotes(s) if s else s
    # unknown type (e.g. None default): a Python literal, else the string itself
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return _strip_quotes(s)


def coerce_value(key: str, raw: str | None, current: Any) -> Any:
    """Parse the command-line string `raw` as the type of the field's current value."""
    if raw is None:
        if isinstance(current, bool):
            return True
        raise ConfigError(f"config override --config.{key} needs a value (--config.{key}=VALUE)")
    if raw.strip().lower() in _NONE and not isinstance(current, str):
        return None  # a string field keeps the text: "none" is a valid value of e.g. model.remat
    if isinstance(current, bool):
        return _coerce_scalar(key, raw, bool)
    if isinstance(current, int):
        return _coerce_scalar(key, raw, int)
    if isinstance(current, float):
        return _coerce_scalar(key, raw, float)
    if isinstance(current, str):
        return _coerce_scalar(key, raw, str)
    if isinstance(current, (tuple, list)):
        s = raw.strip()
        if s in ("", "()", "[]"):
            items: list[Any] = []
        elif s[0] in "([":
            try:
                lit = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                raise ConfigError(f"config key {key!r} is a tuple; cannot parse {raw!r} "
                                  f"(use e.g. \"(1,2)\" or \"a,b\")") from None
            items = list(lit) if isinstance(lit, (tuple, list)) else [lit]
        else:
            items = [p.strip() for p in s.split(",") if p.strip()]
        elem_types = {type(x) for x in current}
        if len(elem_types) == 1:
            (et,) = elem_types
            items = [x if isinstance(x, et) and not (et is int and isinstance(x, bool))
                     else _coerce_scalar(f"{key}[{i}]", str(x), et) for i, x in enumerate(items)]
        else:
            items = [_coerce_scalar(f"{key}[{i}]", x, type(None)) if isinstance(x, str) else x
                     for i, x in enumerate(items)]
        return type(current)(items)
    if current is None:
        return _coerce_scalar(key, raw, type(None))
    raise ConfigError(f"config key {key!r} holds a {type(current).__name__}, which cannot be set "
                      f"from the command line")


def apply_overrides(config: ConfigDict, overrides: Sequence[str] | Sequence[tuple[str, str | None]]) -> ConfigDict:
    """Apply ``--config.a.b=value`` overrides in place (typed like the existing field); returns config."""
    if overrides and isinstance(overrides[0], str):
        pairs = parse_override_args(overrides)  # type: ignore[arg-type]
    else:
        pairs = list(overrides)  # type: ignore[arg-type]
    sections = _sections(config)
    for key, raw in pairs:
        if key in sections:
            raise ConfigError(f"config key {key!r} is a section, not a value; set its fields "
                              f"(e.g. --config.{key}.<field>=...)")
        current = get_path(config, key)
        value = coerce_value(key, raw, current)
        parent_key, _, leaf = key.rpartition(".")
        parent = get_path(config, parent_key) if parent_key else config
        try:
            parent[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot set config key {key!r} to {raw!r}: {e}") from None
    return config


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
class _Checker:
    def __init__(self, config: ConfigDict) -> None:
        self.flat = flatten(config)
        self.errors: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.flat

    def get(self, key: str) -> Any:
        return self.flat[key]

    def fail(self, key: str, msg: str) -> None:
        self.errors.append(f"{key}={self.flat.get(key)!r}: {msg}")

    def one_of(self, key: str, allowed: Sequence[Any]) -> None:
        if self.has(key) and self.get(key) not in allowed:
            self.fail(key, f"expected one of {', '.join(map(repr, allowed))}")

    def subset(self, key: str, allowed: Sequence[Any]) -> None:
        if not self.has(key):
            return
        v = self.get(key)
        if not isinstance(v, (tuple, list)):
            self.fail(key, "expected a tuple")
            return
        bad = [x for x in v if x not in allowed]
        if bad:
            self.fail(key, f"unknown value(s) {bad}; allowed: {', '.join(map(repr, allowed))}")

    def number(self, key: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               hi_open: bool = False, allow: Sequence[Any] = (), integer: bool = False) -> None:
        if not self.has(key):
            return
        v = self.get(key)
        if v in allow and not isinstance(v, bool):
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            self.fail(key, "expected an int" if integer else "expected a number")
            return
        if not math.isfinite(v):
            self.fail(key, "must be finite")
            return
        ok = True
        if lo is not None:
            ok &= v > lo if lo_open else v >= lo
        if hi is not None:
            ok &= v < hi if hi_open else v <= hi
        if not ok:
            lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
            hi_s = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
            rng = f"{lo_s or '(-inf'}, {hi_s or 'inf)'}"
            extra = f" or one of {list(allow)}" if allow else ""
            self.fail(key, f"must be in {rng}{extra}")

    def positive_int(self, key: str, allow: Sequence[int] = ()) -> None:
        self.number(key, lo=1, allow=allow, integer=True)

    def nonneg_int(self, key: str) -> None:
        self.number(key, lo=0, integer=True)

    def prob(self, key: str) -> None:
        self.number(key, lo=0.0, hi=1.0)

    def nonempty_str(self, key: str) -> None:
        if self.has(key) and (not isinstance(self.get(key), str) or not self.get(key).strip()):
            self.fail(key, "must be a non-empty string")

    def divides(self, micro_key: str, batch: int, what: str) -> None:
        if self.has(micro_key):
            m = self.get(micro_key)
            if isinstance(m, int) and m > 0 and batch % m:
                self.fail(micro_key, f"must divide {what} ({batch})")


def validate_config(config: ConfigDict) -> None:
    """Check every known field's type and range; raises ConfigError listing all problems found.

    Fields absent from a config are not required here (a recipe may omit sections it does not use);
    the stage that needs a field fails when it reads it.
    """
    c = _Checker(config)
    if c.has("stages"):
        st = c.get("stages")
        c.subset("stages", STAGE_ORDER)
        if isinstance(st, (tuple, list)) and all(s in STAGE_ORDER for s in st):
            if len(set(st)) != len(st):
                c.fail("stages", "lists a stage twice")
            elif list(st) != sorted(st, key=STAGE_ORDER.index):
                c.fail("stages", f"stages must follow the pipeline order {STAGE_ORDER}")
    c.nonempty_str("name")
    c.nonempty_str("work_dir")
    c.number("seed", lo=0, integer=True)
    # model
    c.one_of("model.dtype", DTYPES)
    c.one_of("model.compute_dtype", DTYPES)
    c.one_of("model.remat", REMAT)
    c.one_of("model.layer_loop", LAYER_LOOPS)
    if c.has("model.path") and c.has("model.preset") and not c.get("model.path") and not c.get("model.preset"):
        c.fail("model.path", "set model.path (HF folder or hub name) or model.preset (random init)")
    if c.has("model.preset") and c.get("model.preset"):
        try:
            presets = import_configs_module("models").PRESETS
        except ConfigError:
            presets = None
        name = c.get("model.preset")
        if presets is not None and name not in presets:
            hint = difflib.get_close_matches(str(name), list(presets), n=1)
            c.fail("model.preset", (f"did you mean {hint[0]!r}? " if hint else "")
                   + f"available shape presets: {', '.join(presets)}")
        elif presets is not None and c.has("warmstart.tokenizer_vocab_size") and "warmstart" in c.get("stages"):
            vocab = presets[name]["vocab_size"]
            if c.get("warmstart.tokenizer_vocab_size") > vocab:
                c.fail("warmstart.tokenizer_vocab_size", f"exceeds the vocabulary of preset {name!r} ({vocab})")
    # embedder
    c.nonempty_str("embedder.path")
    c.positive_int("embedder.batch_size")
    c.positive_int("embedder.max_length")
    c.one_of("embedder.dtype", DTYPES)
    # mesh
    for ax in ("data", "fsdp", "tensor"):
        c.positive_int(f"mesh.{ax}", allow=(-1,))
    axes = ("data", "fsdp", "tensor")
    if all(c.has(f"mesh.{a}") for a in axes) and [c.get(f"mesh.{a}") for a in axes].count(-1) > 1:
        c.fail("mesh.data", "at most one of mesh.data / mesh.fsdp / mesh.tensor may be -1")
    # env
    c.one_of("env.name", ENV_NAMES)
    c.positive_int("env.max_steps")
    c.nonneg_int("env.num_workers")
    c.number("env.step_timeout_s", lo=0, lo_open=True)
    c.nonneg_int("env.num_generated_games")
    if (c.has("env.data_dir") and c.get("env.data_dir") == "generated" and c.has("env.num_generated_games")
            and c.get("env.num_generated_games") == 0):
        c.fail("env.num_generated_games", "env.data_dir='generated' needs a number of games to generate")
    c.subset("env.domains", TAU2_DOMAINS)
    c.subset("env.task_types", ALFWORLD_TASK_TYPES)
    if c.has("env.name") and c.get("env.name") == "alfworld" and c.has("env.split"):
        c.one_of("env.split", ALFWORLD_SPLITS)
    if c.has("env.name") and c.get("env.name") == "tau2":
        if c.has("env.domains") and not c.get("env.domains"):
            c.fail("env.domains", "τ² needs at least one domain")
        for key in ("env.user", "env.user_alt"):
            if not c.has(key) or (key == "env.user_alt" and c.get(key) == ""):
                continue
            u = c.get(key)
            if not (u in ("local", "scripted") or (isinstance(u, str) and u.startswith("litellm:") and len(u) > 8)):
                c.fail(key, "expected 'local', 'scripted' or 'litellm:<model>'"
                       + (" (or '' for none)" if key == "env.user_alt" else ""))
    # collect
    c.positive_int("collect.num_tasks", allow=(-1,))
    c.positive_int("collect.trajectories_per_task")
    c.number("collect.temperature", lo=0.0)
    c.number("collect.top_p", lo=0.0, hi=1.0, lo_open=True)
    c.positive_int("collect.max_new_tokens")
    c.positive_int("collect.max_prompt_tokens")
    c.nonneg_int("collect.history_length")
    c.positive_int("collect.max_live_episodes")
    # triplets
    c.nonneg_int("triplets.history_length")
    c.number("triplets.val_fraction", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    c.number("triplets.seed", lo=0, integer=True)
    # filter (distances d = 1 - cos lie in [0, 2])
    c.positive_int("filter.num_samples")
    c.number("filter.threshold_observation", lo=0.0, hi=2.0, lo_open=True)
    c.number("filter.threshold_user_reply", lo=0.0, hi=2.0, lo_open=True)
    c.prob("filter.tau_easy")
    c.prob("filter.keep_easy_prob")
    c.number("filter.temperature", lo=0.0)
    c.positive_int("filter.max_new_tokens")
    c.number("filter.top_p", lo=0.0, hi=1.0, lo_open=True)
    c.positive_int("filter.batch_prompts")
    c.one_of("triplets.split_by", ("triplet", "task"))
    # rewards
    c.one_of("rewards.kind", REWARD_KINDS)
    c.number("rewards.threshold_observation", lo=0.0, hi=2.0, lo_open=True)
    c.number("rewards.threshold_user_reply", lo=0.0, hi=2.0, lo_open=True)
    c.number("rewards.rouge_grid", lo=0.0, hi=1.0, lo_open=True)
    # rwml
    c.positive_int("rwml.epochs")
    c.number("rwml.learning_rate", lo=0.0, lo_open=True)
    c.positive_int("rwml.batch_prompts")
    c.number("rwml.group_size", lo=2, integer=True)
    c.number("rwml.kl_coef", lo=0.0)
    c.one_of("rwml.kl_estimator", KL_ESTIMATORS)
    c.number("rwml.clip_eps_low", lo=0.0, hi=1.0)
    c.number("rwml.clip_eps_high", lo=0.0)
    c.one_of("rwml.loss_agg", LOSS_AGGS)
    c.number("rwml.temperature", lo=0.0, lo_open=True)
    c.number("rwml.top_p", lo=0.0, hi=1.0, lo_open=True)
    c.positive_int("rwml.max_prompt_tokens")
    c.positive_int("rwml.max_new_tokens")
    c.positive_int("rwml.micro_batch_size")
    c.nonneg_int("rwml.warmup_steps")
    c.number("rwml.max_grad_norm", lo=0.0, lo_open=True)
    c.number("rwml.weight_decay", lo=0.0)
    c.positive_int("rwml.max_steps", allow=(-1,))
    c.positive_int("rwml.eval_every")
    c.positive_int("rwml.eval_size", allow=(-1,))
    c.positive_int("rwml.eval_samples")
    c.number("rwml.eval_temperature", lo=0.0)
    if c.has("rwml.batch_prompts") and c.has("rwml.group_size"):
        bp, g = c.get("rwml.batch_prompts"), c.get("rwml.group_size")
        if isinstance(bp, int) and isinstance(g, int) and bp > 0 and g > 0:
            c.divides("rwml.micro_batch_size", bp * g, "rwml.batch_prompts x rwml.group_size sequences")
    # SFT-style sections
    for sec in ("filter.sft", "wm_sft", "warmstart"):
        c.number(f"{sec}.learning_rate", lo=0.0, lo_open=True)
        c.positive_int(f"{sec}.epochs")
        c.positive_int(f"{sec}.batch_size")
        c.positive_int(f"{sec}.micro_batch_size")
        c.nonneg_int(f"{sec}.warmup_steps")
        if c.has(f"{sec}.batch_size") and isinstance(c.get(f"{sec}.batch_size"), int) and c.get(f"{sec}.batch_size") > 0:
            c.divides(f"{sec}.micro_batch_size", c.get(f"{sec}.batch_size"), f"{sec}.batch_size")
    c.positive_int("warmstart.steps", allow=(-1,))
    c.nonneg_int("warmstart.num_games")
    c.nonempty_str("warmstart.corpus")
    c.positive_int("warmstart.seq_len")
    c.positive_int("warmstart.tokenizer_vocab_size")
    # optimiser
    c.prob("optimizer.b1")
    c.prob("optimizer.b2")
    c.number("optimizer.eps", lo=0.0, lo_open=True)
    c.one_of("optimizer.state_dtype", ("float32", "bfloat16"))
    # checkpoint / logging
    c.positive_int("checkpoint.every_steps")
    c.positive_int("checkpoint.keep")
    c.positive_int("logging.log_every")
    c.nonneg_int("logging.num_sample_texts")
    _validate_eval(c)
    if c.errors:
        name = c.flat.get("name", "?")
        raise ConfigError(f"invalid config {name!r}:\n  " + "\n  ".join(c.errors))


def _validate_eval(c: _Checker) -> None:
    """The `eval` section (rwml_jax/train/stages/eval.py)."""
    if not any(k.startswith("eval.") for k in c.flat):
        return
    c.subset("eval.splits", ALFWORLD_SPLITS)
    if c.has("eval.splits") and not c.get("eval.splits"):
        c.fail("eval.splits", "must name at least one ALFWorld split")
    c.positive_int("eval.max_steps")
    c.positive_int("eval.runs")
    c.number("eval.temperature", lo=0.0)
    c.number("eval.top_p", lo=0.0, hi=1.0, lo_open=True)
    c.positive_int("eval.num_tasks", allow=(-1,))
    c.nonneg_int("eval.num_generated_games")
    c.positive_int("eval.max_live_episodes")
    model_stages = ("warmstart", "rwml", "wm_sft")
    if c.has("eval.model") and c.get("eval.model") not in ("", "base", *model_stages):
        c.fail("eval.model", f"must be '' (the last model stage before eval), 'base' or one of {model_stages}")
    if c.has("eval.user"):
        u = c.get("eval.user")
        if not isinstance(u, str) or not (u == "scripted" or (u.startswith("litellm:") and len(u) > 8)):
            c.fail("eval.user", "must be 'scripted' or 'litellm:<model>'")
    generated = c.has("eval.data_dir") and (c.get("eval.data_dir") == "generated" or (
        c.get("eval.data_dir") == "" and c.has("env.data_dir") and c.get("env.data_dir") == "generated"))
    stages = c.get("stages") if c.has("stages") else ()
    if "eval" in stages and c.has("env.name") and c.get("env.name") == "alfworld" and generated \
            and c.has("eval.num_generated_games") and c.get("eval.num_generated_games") < 1:
        c.fail("eval.num_generated_games", "must be >= 1 when the evaluation games are generated")


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def load_config(path_or_name: str | os.PathLike, overrides: Sequence[str] = (), *, validate: bool = True) -> ConfigDict:
    """Load a recipe, apply ``--config.KEY=VALUE`` overrides, validate, lock.

    path_or_name: a recipe name in configs/ ("rwml_alfworld", "demo_cpu:fast") or a file path
      ("my.py", "my.py:arg"); the file's ``get_config()`` (or ``get_config(arg)``) builds the config.
    Raises ConfigError (unknown recipe or key, with the closest valid name; unparsable value; values out of
    range) before anything else happens.
    """
    path, arg = resolve_config_path(str(path_or_name))
    mod = _load_module(path)
    fn = getattr(mod, "get_config", None)
    if fn is None:
        raise ConfigError(f"config file {path} defines no get_config()")
    try:
        config = fn(arg) if arg is not None else fn()
    except TypeError as e:
        if arg is not None and "positional argument" in str(e):
            raise ConfigError(f"config file {path}: get_config() takes no argument, but {arg!r} was given") from None
        raise
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path.name}:{arg}: {e}" if arg is not None else f"{path.name}: {e}") from None
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected ml_collections.ConfigDict")
    config.lock()
    apply_overrides(config, list(overrides))
    if validate:
        validate_config(config)
    return config


# ------------------------------------------------------------------------------------------------
# Provenance
# ------------------------------------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if isinstance(v, ConfigDict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


def config_to_dict(config: ConfigDict) -> dict[str, Any]:
    """A JSON-ready nested dict (tuples become lists)."""
    return _jsonable(config)


def save_config(config: ConfigDict, path: str | os.PathLike) -> Path:
    """Write ``config.json`` (JSON) and, next to it, ``config.py.txt`` (the ConfigDict's repr) atomically.

    Returns the JSON path. The repr keeps types JSON loses (tuples vs lists) for provenance.
    """
    path = Path(path)
    if path.suffix != ".json":
        path = path / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")
    _atomic_write(path.with_suffix(".py.txt"), repr(config) + "\n")
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def select(config: ConfigDict, keys: Iterable[str], ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The flat {dotted key: value} of the parts of `config` under `keys` (sections or leaves), minus
    anything under `ignore`; tuples become lists (JSON-stable)."""
    flat = flatten(config)
    keys, ignore = list(keys), list(ignore)

    def under(k: str, prefixes: list[str]) -> bool:
        return any(k == p or k.startswith(p + ".") for p in prefixes)

    for k in keys:
        if k not in flat and not any(f.startswith(k + ".") for f in flat):
            raise _unknown_key_error(k, config)
    return {k: _jsonable(v) for k, v in sorted(flat.items()) if under(k, keys) and not under(k, ignore)}


def config_hash(values: Mapping[str, Any]) -> str:
    """sha256 (hex, 16 chars) of a flat {key: value} dict, stable across runs and Python versions."""
    blob = json.dumps(_jsonable(dict(values)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
