"""Stage outputs on disk: atomic files, JSONL records, provenance, and DONE markers for reuse.

Every pipeline stage owns ``<work_dir>/<stage>/`` (an instance ``policy_rl@rwml`` owns
``<work_dir>/policy_rl@rwml/``, see `rwml_jax.config.stages`). Inside it:

    STARTED.json   written when the stage starts: the config values it depends on, their hash, provenance
    DONE.json      written last, atomically: the same + timings, summary numbers, the upstream stages' ids
    ...            the stage's own outputs (trajectories.jsonl, triplets_train.jsonl, checkpoints/, ...)

`Stage.begin(config)` decides what `rwml-jax run` does with a stage:

* ``"done"``: DONE.json exists with the same dependent config values and the same upstream outputs: reuse it.
* ``"resume"``: STARTED.json exists (a run was killed) with the same values: continue (checkpoints inside).
* ``"fresh"``: nothing there yet (or `force`): start from scratch.

A stage output made with *different* values raises `StageConfigMismatch` naming each differing key with
both values, unless ``force=True``, which moves the old folder aside to ``<stage>.replaced-<time>``
(nothing written is ever deleted) and starts fresh. Which config keys a stage depends on is `stage_deps`:
the keys its module declares (``CONFIG_KEYS`` in ``rwml_jax/train/stages/<stage>.py``, less its
``IGNORED_KEYS``) plus everything its upstream stages depend on; knobs that change speed or memory but
not results (micro-batch sizes, worker counts, the mesh, the execution options, logging, checkpoint
cadence) are ignored, so a run can be resumed on a different machine shape.

All writes here are atomic: a temporary file in the same folder, fsync, then ``os.replace``. A reader sees
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from rwml_jax.config import (
    STAGE_ORDER,
    ConfigDict,
    config_hash,
    config_to_dict,
    has_path,
    select,
)
from rwml_jax.config.stages import READS, check_stage, stage_instance, stage_kind

T = TypeVar("T")

# Keys that change speed, memory or logging but not what any stage computes (fnmatch patterns); each
# stage module adds its own in IGNORED_KEYS.
RUN_IGNORED_KEYS: tuple[str, ...] = (
    "name", "work_dir", "stages", "mesh.*", "execution.*", "logging.*", "checkpoint.*", "*.micro_batch_size",
)


class StageConfigMismatch(RuntimeError):
    """A stage folder holds output made with different config values (or from different upstream outputs)."""


class StageError(RuntimeError):
    """A stage output is missing or unreadable."""


# ------------------------------------------------------------------------------------------------
# Atomic files
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kw: Any) -> Iterator[IO[Any]]:
    """Open a temporary file next to `path`; on a clean exit fsync it and rename it onto `path`.

    On an exception (or a kill) `path` keeps its previous content and the temporary file is removed (or
    left as ``.<name>.tmp-*``, which nothing reads).
    """
    if "w" not in mode:
        raise ValueError("atomic_open writes whole files: use mode 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    f = open(tmp, mode, **kw)  # noqa: SIM115  (closed below on every path)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def _default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, ConfigDict):
        return config_to_dict(o)
    if hasattr(o, "item") and getattr(o, "ndim", None) == 0:  # numpy / jax scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def to_json(obj: Any, **kw: Any) -> str:
    """json.dumps that also handles dataclasses, numpy/jax scalars and arrays, paths and sets."""
    return json.dumps(obj, default=_default, ensure_ascii=False, **kw)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, to_json(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# JSONL
# ------------------------------------------------------------------------------------------------
def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Write one JSON object per line, atomically (dataclasses become dicts). Returns the record count."""
    n = 0
    with atomic_open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(to_json(r))
            f.write("\n")
            n += 1
    return n


def append_jsonl(path: str | os.PathLike, records: Iterable[Any], *, fsync: bool = True) -> int:
    """Append records to a JSONL file (for outputs that grow while a stage runs, e.g. finished episodes).

    A kill mid-append leaves at most one truncated last line, which `read_jsonl` drops (and reports) by
    default; records before it are intact. Returns the number appended.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [to_json(r) + "\n" for r in records]
    if not lines:
        return 0
    _repair_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return len(lines)


def _repair_tail(path: Path) -> None:
    """Cut a truncated last line (no trailing newline) left by a killed append."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:  # scan backwards for the last complete line
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                f.truncate(start + nl + 1)
                return
            pos = start
        f.truncate(0)


def _from_record(cls: type[T] | None, d: Any) -> T | Any:
    if cls is None:
        return d
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)  # type: ignore[attr-defined]
    if dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise StageError(f"record has fields {sorted(unknown)} that {cls.__name__} does not")
        return cls(**d)
    return cls(d)  # type: ignore[call-arg]


def read_jsonl(path: str | os.PathLike, cls: type[T] | None = None, *, allow_partial_tail: bool = True) -> list[T]:
    """Read a JSONL file into dicts, or into `cls` (a dataclass, or anything with ``from_dict``).

    allow_partial_tail: drop a truncated last line (a killed `append_jsonl`) instead of raising. A malformed
    line anywhere else raises StageError naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise StageError(f"missing stage output {path}")
    out: list[Any] = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            if allow_partial_tail and i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise StageError(f"{path}:{i + 1}: malformed JSON line ({e})") from None
        out.append(_from_record(cls, d))
    return out


def iter_jsonl(path: str | os.PathLike, cls: type[T] | None = None) -> Iterator[T]:
    """Stream a JSONL file record by record (complete lines only)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                yield _from_record(cls, json.loads(line))


class StepRecords:
    """A JSONL file of per-step records (`{"step": ..., ...}`, e.g. a stage's held-out evaluations) that a
    resumed stage cuts back to its restored step."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def records(self, upto: int | None = None) -> list[dict[str, Any]]:
        recs = read_jsonl(self.path) if self.path.exists() else []
        return [r for r in recs if upto is None or r["step"] <= upto]

    def truncate(self, step: int) -> None:
        """Keep the records of steps <= `step` (none when `step` < 0)."""
        if self.path.exists():
            write_jsonl(self.path, self.records(step))

    def append(self, record: Mapping[str, Any]) -> None:
        append_jsonl(self.path, [record])


# ------------------------------------------------------------------------------------------------
# Provenance
# ------------------------------------------------------------------------------------------------
def git_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} of the repository holding `path` (default: rwml_jax)."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip() or None
        if sha is None:
            return {"commit": None, "dirty": None}
        st = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=20, check=False)
        return {"commit": sha, "dirty": bool(st.stdout.strip()) if st.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def provenance(config: ConfigDict, stage: str | None = None) -> dict[str, Any]:
    """Who made an output: model, seed, the full config, code version (git), software, host, time."""
    versions: dict[str, str] = {}
    for mod in ("rwml_jax", "jax", "flax", "optax", "orbax.checkpoint", "transformers"):
        m = sys.modules.get(mod)
        v = getattr(m, "__version__", None) if m else None
        if v:
            versions[mod] = str(v)
    model = config.get("model", {})
    return {
        "stage": stage,
        "recipe": config.get("name"),
        "model": (model.get("path") or f"preset:{model.get('preset')}") if model else None,
        "seed": config.get("seed"),
        "config": config_to_dict(config),
        "git": git_info(),
        "versions": versions,
        "python": platform.python_version(),
        "host": platform.node(),
        "argv": list(sys.argv),
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------------
# Stage dependencies
# ------------------------------------------------------------------------------------------------
def upstream_stages(stage: str, stages: Sequence[str], policy_rl_init: str = "rwml") -> list[str]:
    """The stages of this run whose outputs `stage` reads: all earlier ones, except that wm_sft does not
    read rwml's, a stage in `READS` reads only those it lists, and a policy_rl stage reads only its start model's stage and that stage's upstream
    (`policy_rl@base`: the warm start, when the run has one), so the arms of one work dir stay independent.
    policy_rl_init: the start model of a plain `policy_rl` (config.policy_rl.init)."""
    check_stage(stage)
    kind = stage_kind(stage)
    if kind == "policy_rl":
        init = stage_instance(stage) or policy_rl_init
        if init == "base":
            return [s for s in ("warmstart",) if s in stages]
        if init not in stages:
            return []
        return [*upstream_stages(init, stages), init]
    before = STAGE_ORDER[: STAGE_ORDER.index(kind)]
    return [s for s in stages if stage_kind(s) in before and not (kind == "wm_sft" and s == "rwml")
            and (kind not in READS or s in READS[kind])]


def stage_config_keys(stage: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(CONFIG_KEYS, IGNORED_KEYS) that the module ``rwml_jax.train.stages.<stage>`` declares: the config
    keys or sections its own computation reads, and the patterns among them that do not change its output."""
    check_stage(stage)
    # imported here: every stage module imports this one
    mod = importlib.import_module(f"rwml_jax.train.stages.{stage_kind(stage)}")
    return tuple(mod.CONFIG_KEYS), tuple(getattr(mod, "IGNORED_KEYS", ()))


def stage_deps(config: ConfigDict, stage: str) -> dict[str, Any]:
    """{dotted key: value} of every config value `stage`'s output depends on (its own and upstream).
    A `policy_rl@<init>` instance depends on `policy_rl.init` = its instance name, whatever the config says."""
    out: dict[str, Any] = {}
    for s in [*upstream_stages_of(config, stage), stage]:
        keys, ignored = stage_config_keys(s)
        ignored = RUN_IGNORED_KEYS + ignored
        values = select(config, [k for k in keys if has_path(config, k)])
        out.update({k: v for k, v in values.items() if not any(fnmatch.fnmatchcase(k, p) for p in ignored)})
    if stage_kind(stage) == "policy_rl" and "policy_rl.init" in out:
        out["policy_rl.init"] = policy_rl_init(config, stage)
    return dict(sorted(out.items()))


def policy_rl_init(config: ConfigDict, stage: str) -> str:
    """The start model of a policy_rl stage: its instance name, else `policy_rl.init`."""
    return stage_instance(stage) or str(config.policy_rl.init)


def upstream_stages_of(config: ConfigDict, stage: str) -> list[str]:
    """`upstream_stages` of `stage` in `config`'s run (a plain `policy_rl` reads `policy_rl.init`)."""
    init = str(config.policy_rl.init) if has_path(config, "policy_rl.init") else "rwml"
    return upstream_stages(stage, list(config.get("stages", STAGE_ORDER)), init)


def diff_values(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences, one per key: "rwml.learning_rate: 1e-06 (stored) != 2e-06 (now)"."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k not in new:
            out.append(f"{k}: {old[k]!r} (stored) is not in the current config")
        elif k not in old:
            out.append(f"{k}: not in the stored config, now {new[k]!r}")
        elif old[k] != new[k]:
            out.append(f"{k}: {old[k]!r} (stored) != {new[k]!r} (now)")
    return out


# ------------------------------------------------------------------------------------------------
# Stage folders
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Stage:
    """One stage's folder ``<work_dir>/<name>`` and its STARTED / DONE markers."""

    work_dir: Path
    name: str

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)
        check_stage(self.name)
        self._t0: float | None = None

    @property
    def path(self) -> Path:
        return self.work_dir / self.name

    def file(self, relpath: str) -> Path:
        """A path inside the stage folder (the folder is created)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / relpath

    @property
    def done_file(self) -> Path:
        return self.path / "DONE.json"

    @property
    def started_file(self) -> Path:
        return self.path / "STARTED.json"

    def is_done(self) -> bool:
        return self.done_file.exists()

    def read_done(self) -> dict[str, Any]:
        if not self.is_done():
            raise StageError(f"stage {self.name!r} has not finished in {self.work_dir} (no {self.done_file.name}); "
                             f"run it first (rwml-jax run ... or rwml-jax {self.name.replace('_', '-')} ...)")
        return read_json(self.done_file)

    def run_id(self) -> str | None:
        """The id of the finished output (changes whenever the stage is recomputed)."""
        return read_json(self.done_file)["run_id"] if self.is_done() else None

    def _upstream_ids(self, config: ConfigDict) -> dict[str, str | None]:
        return {s: Stage(self.work_dir, s).run_id() for s in upstream_stages_of(config, self.name)
                if Stage(self.work_dir, s).path.exists()}

    def _check(self, marker: dict[str, Any], config: ConfigDict, what: str) -> list[str]:
        problems = diff_values(marker.get("deps", {}), stage_deps(config, self.name))
        for s, rid in self._upstream_ids(config).items():
            stored = marker.get("upstream", {}).get(s)
            if s in marker.get("upstream", {}) and stored != rid:
                problems.append(f"upstream stage {s!r} was recomputed since this {what} was made "
                                f"(its output id {stored} -> {rid})")
        return problems

    def status(self, config: ConfigDict) -> str:
        """"done", "resume", "fresh", or "mismatch" (what `begin` would do, without side effects)."""
        for marker_file, ok in ((self.done_file, "done"), (self.started_file, "resume")):
            if marker_file.exists():
                return "mismatch" if self._check(read_json(marker_file), config, ok) else ok
        return "fresh"

    def begin(self, config: ConfigDict, *, force: bool = False) -> str:
        """Start (or reuse, or resume) this stage; returns "done", "resume" or "fresh" (see module doc).

        Raises StageConfigMismatch naming the differing keys when the folder holds output of a different
        config (or of since-recomputed upstream stages) and not `force`. With `force`, an existing folder is
        renamed to ``<stage>.replaced-<UTC time>`` and the stage starts fresh.
        """
        if force and self.path.exists() and any(self.path.iterdir()):
            self.move_aside()
        for marker_file, state in ((self.done_file, "done"), (self.started_file, "resume")):
            if not marker_file.exists():
                continue
            marker = read_json(marker_file)
            problems = self._check(marker, config, "output" if state == "done" else "partial output")
            if problems:
                kind = "finished" if state == "done" else "partial (resumable)"
                raise StageConfigMismatch(
                    f"{self.path} holds a {kind} '{self.name}' output made with a different config:\n  "
                    + "\n  ".join(problems)
                    + f"\nRerun with --force to recompute it (the old folder is kept as {self.name}.replaced-*),"
                    f" or use another --config.work_dir."
                )
            self._t0 = time.time()
            return state
        self.path.mkdir(parents=True, exist_ok=True)
        deps = stage_deps(config, self.name)
        atomic_write_json(self.started_file, {
            "stage": self.name, "deps": deps, "config_hash": config_hash(deps),
            "upstream": self._upstream_ids(config), "provenance": provenance(config, self.name),
        })
        self._t0 = time.time()
        return "fresh"

    def finish(self, config: ConfigDict, *, summary: Mapping[str, Any] | None = None,
               timings: Mapping[str, float] | None = None, outputs: Sequence[str] = ()) -> dict[str, Any]:
        """Mark the stage finished: DONE.json (atomic, written last). `outputs` are file names inside the
        folder that must exist (checked, and listed with their sizes)."""
        missing = [o for o in outputs if not (self.path / o).exists()]
        if missing:
            raise StageError(f"stage {self.name!r} cannot finish: outputs {missing} are missing in {self.path}")
        started = read_json(self.started_file) if self.started_file.exists() else {}
        deps = stage_deps(config, self.name)
        t = dict(timings or {})
        if self._t0 is not None:
            t.setdefault("wall_s_this_session", round(time.time() - self._t0, 3))
        done = {
            "stage": self.name,
            "run_id": uuid.uuid4().hex,
            "deps": deps,
            "config_hash": config_hash(deps),
            "upstream": started.get("upstream", self._upstream_ids(config)),
            "summary": dict(summary or {}),
            "timings": t,
            "outputs": {o: (self.path / o).stat().st_size for o in outputs},
            "provenance": provenance(config, self.name),
            "started": started.get("provenance", {}).get("time"),
        }
        atomic_write_json(self.done_file, done)
        return done

    def move_aside(self) -> Path:
        """Rename the stage folder to ``<stage>.replaced-<UTC time>``; returns the new path."""
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
        dest = self.work_dir / f"{self.name}.replaced-{stamp}"
        i = 1
        while dest.exists():
            dest = self.work_dir / f"{self.name}.replaced-{stamp}-{i}"
            i += 1
        shutil.move(str(self.path), str(dest))
        return dest
