"""A sweep's plan: its points, their names and configs, and which stage outputs they share.

A sweep file is a Python file whose ``get_sweep()`` returns ``(recipe, points)``: the base recipe
("demo_cpu:smoke", "rwml_alfworld", a path) and a list of points built with `rwml_jax.config.hyper`, each
point ``{dotted key: Python value}``. The layout of a sweep folder::

    <sweep_dir>/sweep.json                the manifest: recipe, points (name, values, stage folders)
    <sweep_dir>/_shared/<stage>-<hash>/   one folder per distinct stage output; <hash> = config_hash of
                                          stage_deps (the `config_hash` its DONE.json records)
    <sweep_dir>/<point>/                  the point's work_dir: config.json, point.json, log.txt, status.json,
        <stage> -> ../_shared/<stage>-<hash>   one relative symlink per stage of the recipe

Every stage folder of a point is a symlink into ``_shared``, so points whose configs agree on everything a
stage depends on (its own keys and its upstream stages', `stage_io.stage_deps`) get the same folder, and
the stage runs once. The point itself runs as a plain ``rwml-jax run`` on its work_dir: `Stage.begin`
follows the symlinks, finds DONE.json of a stage another point finished and reuses it (its own check of
the dependent values and upstream output ids still applies), and resumes a STARTED one. A stage output
never depends on the work_dir path (stages read their inputs through ``<work_dir>/<stage>``), so sharing
is exact; ``<work_dir>/triplets.embcache`` (a cache beside a stage folder) stays per point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rwml_jax.config import ConfigDict, ConfigError, configs_dir, config_hash, get_path, load_config
from rwml_jax.config.recipes import import_file
from rwml_jax.train.stage_io import Stage, atomic_write_json, read_json, stage_deps

SWEEP_MANIFEST = "sweep.json"
SHARED = "_shared"
SLUG_CHARS = 80  # the readable part of a point name; a hash of the whole point follows it


@dataclasses.dataclass
class Point:
    """One point of a sweep: its swept values, command-line overrides, loaded config and stage folders."""

    name: str
    values: dict[str, Any]
    args: list[str]  # --config.KEY=TEXT for the swept values, then the sweep's own extra overrides
    config: ConfigDict
    work_dir: Path
    stages: dict[str, str]  # stage -> "<stage>-<hash>", its folder under <sweep_dir>/_shared

    def stage(self, name: str) -> Stage:
        return Stage(self.work_dir, name)

    def is_finished(self) -> bool:
        """Every stage's output exists and was made with this point's config (what `rwml-jax run` reuses)."""
        return all(self.stage(s).status(self.config) == "done" for s in self.stages)

    def pending_stages(self) -> list[str]:
        """The stages' shared keys whose output is not finished yet."""
        return [key for s, key in self.stages.items() if not self.stage(s).is_done()]


@dataclasses.dataclass
class SweepPlan:
    recipe: str
    sweep_file: str
    sweep_dir: Path
    points: list[Point]
    extra_overrides: list[str]

    @property
    def shared_dir(self) -> Path:
        return self.sweep_dir / SHARED

    def runs_per_stage(self) -> dict[str, int]:
        """{stage: distinct outputs the points need} (a stage shared by every point: 1)."""
        out: dict[str, set[str]] = {}
        for p in self.points:
            for s, key in p.stages.items():
                out.setdefault(s, set()).add(key)
        return {s: len(keys) for s, keys in out.items()}


# ------------------------------------------------------------------------------------------------
# The sweep file
# ------------------------------------------------------------------------------------------------
def resolve_sweep_file(spec: str) -> Path:
    """A path, or a name in the repository's ``configs/sweeps/`` ("demo_rwml_lr")."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p.resolve()
    d = configs_dir()
    if d is not None and "/" not in spec:
        cand = d / "sweeps" / (spec if spec.endswith(".py") else f"{spec}.py")
        if cand.is_file():
            return cand
    raise ConfigError(f"sweep file {spec!r} does not exist"
                      + (f" (nor in {d / 'sweeps'})" if d is not None else ""))


def load_sweep(path: str | os.PathLike) -> tuple[str, list[dict[str, Any]]]:
    """(recipe, points) from the file's ``get_sweep()``."""
    path = resolve_sweep_file(os.fspath(path))
    mod = import_file(path, "_rwml_sweep")
    fn = getattr(mod, "get_sweep", None)
    if fn is None:
        raise ConfigError(f"sweep file {path} defines no get_sweep()")
    got = fn()
    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], str)):
        raise ConfigError(f"{path.name}: get_sweep() must return (recipe, points); got {type(got).__name__}")
    recipe, points = got
    if not isinstance(points, Sequence) or not points or not all(isinstance(p, Mapping) for p in points):
        raise ConfigError(f"{path.name}: get_sweep()'s points must be a non-empty list of {{key: value}} dicts "
                          f"(build them with rwml_jax.config.hyper)")
    return recipe, [dict(p) for p in points]


# ------------------------------------------------------------------------------------------------
# Points: override text, names
# ------------------------------------------------------------------------------------------------
def override_text(value: Any) -> str:
    """The command-line text `rwml_jax.config.overrides` reads back as `value` for a field of its type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    if isinstance(value, str):
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        return repr(value) if quoted else value
    return repr(value)


def _value_slug(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "+".join(_value_slug(v) for v in value) or "empty"
    return str(value) if not isinstance(value, float) else repr(value)


def key_labels(keys: Sequence[str]) -> dict[str, str]:
    """Each swept key's shortest dotted suffix that no other swept key ends with."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if not any(o != k and (o == label or o.endswith("." + label)) for o in keys):
                break
        out[k] = label
    return out


def point_id(values: Mapping[str, Any]) -> str:
    """8 hex digits of the point's values (types kept: a tuple and a list differ)."""
    blob = json.dumps({k: repr(v) for k, v in sorted(values.items())}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def point_name(values: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """``learning_rate=0.0003,kl_coef=0.01-1a2b3c4d``: filesystem-safe (letters, digits and ``._+=,-``),
    readable, unique per set of values (the hash of all of them ends it)."""
    slug = ",".join(f"{labels.get(k, k)}={_value_slug(v)}" for k, v in values.items()) or "base"
    slug = re.sub(r"[^A-Za-z0-9._+=,-]", "_", slug)[:SLUG_CHARS].lstrip("._-") or "p"
    return f"{slug}-{point_id(values)}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def stage_key(config: ConfigDict, stage: str) -> str:
    """``<stage>-<hash>``: the hash is config_hash(stage_deps), as the stage's DONE.json records it."""
    return f"{stage}-{config_hash(stage_deps(config, stage))}"


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
def plan_sweep(sweep_file: str | os.PathLike, sweep_dir: str | os.PathLike | None = None,
               extra_overrides: Sequence[str] = ()) -> SweepPlan:
    """Load a sweep file, build and validate every point's config (all problems reported together, each
    naming its point), and compute its stage folders. Runs nothing and writes nothing."""
    path = resolve_sweep_file(os.fspath(sweep_file))
    recipe, raw = load_sweep(path)
    sweep_dir = Path(sweep_dir) if sweep_dir else Path("runs") / "sweeps" / path.stem
    keys = list(dict.fromkeys(k for p in raw for k in p))
    labels = key_labels(keys)
    points, errors, seen = [], [], {}
    for i, values in enumerate(raw):
        name = point_name(values, labels)
        where = f"point {i} {name}"
        if name in seen:
            errors.append(f"{where}: the same values as point {seen[name]}")
            continue
        seen[name] = i
        if "work_dir" in values:
            errors.append(f"{where}: work_dir is set by the sweep (<sweep_dir>/<point>); use --sweep-dir")
            continue
        args = [f"--config.{k}={override_text(v)}" for k, v in values.items()] + list(extra_overrides)
        work = sweep_dir / name
        try:
            config = load_config(recipe, [*args, f"--config.work_dir={work}"])
            for k, v in values.items():
                got = get_path(config, k)
                if not _same(got, v):
                    raise ConfigError(f"{k}: the sweep's value {v!r} reads back as {got!r} (a value of another "
                                      f"type than the field's {type(got).__name__}?)")
            stages = {s: stage_key(config, s) for s in config.stages}
        except ConfigError as e:
            errors.append(f"{where}: " + str(e).replace("\n", "\n    "))
            continue
        points.append(Point(name, dict(values), args, config, work, stages))
    if errors:
        raise ConfigError(f"sweep {path.name}: {len(errors)} of {len(raw)} points are invalid; nothing was run:\n  "
                          + "\n  ".join(errors))
    return SweepPlan(recipe, os.fspath(path), sweep_dir, points, list(extra_overrides))


def manifest(plan: SweepPlan) -> dict[str, Any]:
    """The JSON form of a plan (what `sweep.json` holds; the table and `rwml-jax compare` read it)."""
    return {
        "recipe": plan.recipe, "sweep_file": plan.sweep_file, "extra_overrides": plan.extra_overrides,
        "keys": list(dict.fromkeys(k for p in plan.points for k in p.values)),
        "points": [{"name": p.name, "values": {k: repr(v) for k, v in p.values.items()}, "args": p.args,
                    "stages": p.stages} for p in plan.points],
    }


def link_stages(plan: SweepPlan, point: Point) -> None:
    """Make ``<point>/<stage>`` a relative symlink to its ``_shared`` folder (created) for every stage;
    a link to another folder (the point's config changed) is replaced, a real folder is refused."""
    point.work_dir.mkdir(parents=True, exist_ok=True)
    for stage, key in point.stages.items():
        target = plan.shared_dir / key
        target.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(target, point.work_dir)
        link = point.work_dir / stage
        if link.is_symlink():
            if os.readlink(link) == rel:
                continue
        elif link.exists():
            raise ConfigError(f"{link} is a real folder, not a link into {plan.shared_dir}: move it away first")
        tmp = link.with_name(f".{stage}.link-{os.getpid()}")
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(rel, tmp)
        os.replace(tmp, link)
    record = {"name": point.name, "values": {k: repr(v) for k, v in point.values.items()}, "args": point.args,
              "stages": point.stages}
    path = point.work_dir / "point.json"
    if not path.exists() or read_json(path) != record:
        atomic_write_json(path, record)


def write_manifest(plan: SweepPlan) -> Path:
    return atomic_write_json(plan.sweep_dir / SWEEP_MANIFEST, manifest(plan))
