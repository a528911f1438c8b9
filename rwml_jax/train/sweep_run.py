"""Running a sweep's points: subprocesses on slices of the local accelerators, shared stages run once.

Each point runs as ``python -m rwml_jax.cli run RECIPE <its overrides> --config.work_dir=<sweep_dir>/<point>``
(its output in ``<point>/log.txt``), so a point is exactly the run a user would start by hand, and its
stages resume by themselves. Scheduling, `run_sweep`:

* A point whose every stage is finished (for its config) is skipped: nothing of it is touched.
* A point starts when a slot is free and none of its unfinished stage folders is needed by a running
  point: the first point runs the shared upstream stages, and the points that share them wait until
  those are finished, then run only their own stages (``--parallel`` of them at once).
* A failed point is recorded in ``<point>/status.json`` (status, exit code, error line, traceback tail, log
  file) and the sweep goes on; the points that need the shared stage it failed in are recorded as
  ``upstream_failed`` without running. A re-run retries both.
* The sweep holds ``<sweep_dir>/.lock`` (a second sweep on the same folder is refused); points die with
  the sweep (PR_SET_PDEATHSIG on Linux), so a sweep killed mid-way leaves STARTED stages that the next
  run of the same command resumes.

Slots: with local GPUs (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``) or TPU chips (``/dev/accel*``,
``/dev/vfio/[0-9]*``) each of the N parallel points gets a disjoint contiguous slice of count // N
devices (``CUDA_VISIBLE_DEVICES``; TPU: ``TPU_VISIBLE_CHIPS`` with its process bounds and a port of its
own); on CPU, points are plain processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rwml_jax.train.sweep import Point, SweepPlan, link_stages, write_manifest
from rwml_jax.train.stage_io import atomic_write_json, read_json

STATUS_FILE = "status.json"
LOG_FILE = "log.txt"
TAIL_LINES = 25
TPU_CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}  # chips per process -> TPU_CHIPS_PER_PROCESS_BOUNDS
TPU_BASE_PORT = 8476


class SweepBusy(RuntimeError):
    """Another sweep holds the sweep folder's lock."""


# ------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------
def local_accelerators() -> tuple[str, list[str]]:
    """("cuda", ids) / ("tpu", chip indices) / ("cpu", []) without initialising JAX (which would claim them)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
        if ids:
            return "cuda", ids
    elif shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            n = sum(line.startswith("GPU ") for line in out.splitlines())
            if n:
                return "cuda", [str(i) for i in range(n)]
    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    if chips:
        return "tpu", [str(i) for i in range(len(chips))]
    return "cpu", []


def device_slots(parallel: int, accelerators: tuple[str, list[str]] | None = None) -> list[dict[str, str]]:
    """The environment of each of `parallel` slots: disjoint device slices (see module doc)."""
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1; got {parallel}")
    kind, ids = accelerators or local_accelerators()
    if kind == "cpu":
        return [{} for _ in range(parallel)]
    if len(ids) < parallel:
        raise ValueError(f"--parallel {parallel} needs at least {parallel} {kind} devices; found {len(ids)} ({ids})")
    per = len(ids) // parallel
    slices = [ids[i * per:(i + 1) * per] for i in range(parallel)]
    if kind == "cuda":
        return [{"CUDA_VISIBLE_DEVICES": ",".join(s)} for s in slices]
    if parallel == 1:
        return [{}]  # one process: every chip, the TPU runtime's own defaults
    if per not in TPU_CHIP_BOUNDS:
        raise ValueError(f"--parallel {parallel} gives each point {per} TPU chips; supported: {sorted(TPU_CHIP_BOUNDS)}")
    return [{"TPU_VISIBLE_CHIPS": ",".join(s), "TPU_VISIBLE_DEVICES": ",".join(s),
             "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_CHIP_BOUNDS[per], "TPU_PROCESS_BOUNDS": "1,1,1",
             "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{TPU_BASE_PORT + i}",
             "TPU_MESH_CONTROLLER_PORT": str(TPU_BASE_PORT + i), "TPU_PROCESS_PORT": str(TPU_BASE_PORT + i)}
            for i, s in enumerate(slices)]


# ------------------------------------------------------------------------------------------------
# Point records
# ------------------------------------------------------------------------------------------------
def read_status(point_dir: Path) -> dict[str, Any]:
    """The point's status.json, or {} before its first start."""
    try:
        return read_json(point_dir / STATUS_FILE)
    except (FileNotFoundError, ValueError):
        return {}


def _tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64_000))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return []
    return lines[-n:]


_ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Mismatch|Interrupt|Exit)\b.*|^rwml-jax: .*")


def error_line(tail: list[str]) -> str:
    """The last exception line of a log tail (``ValueError: ...``), else its last line."""
    for line in reversed(tail):
        if _ERROR_LINE.match(line.strip()):
            return line.strip()
    return tail[-1].strip() if tail else ""


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------
def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn making the child get SIGKILL when the sweep process dies (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def fn() -> None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os._exit(1)

    return fn


def point_command(plan: SweepPlan, point: Point) -> list[str]:
    return [sys.executable, "-m", "rwml_jax.cli", "run", plan.recipe, *point.args, f"--config.work_dir={point.work_dir}"]


@dataclasses.dataclass
class _Running:
    point: Point
    proc: subprocess.Popen
    slot: int
    needs: set[str]  # the shared stage folders it had to compute when it started
    t0: float


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepBusy(f"another sweep is running in {sweep_dir} (it holds {sweep_dir / '.lock'})") from None
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def _record(point: Point, **fields: Any) -> dict[str, Any]:
    rec = {"name": point.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "log": str(point.work_dir / LOG_FILE), **fields}
    atomic_write_json(point.work_dir / STATUS_FILE, rec)
    return rec


def run_sweep(plan: SweepPlan, *, parallel: int = 1, slots: list[dict[str, str]] | None = None,
              poll_s: float = 0.5, echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run every unfinished point of `plan` (module doc); returns {point name: its status record}."""
    slots = slots if slots is not None else device_slots(parallel)
    with sweep_lock(plan.sweep_dir):
        write_manifest(plan)
        for p in plan.points:
            link_stages(plan, p)
        records: dict[str, dict[str, Any]] = {}
        pending: list[Point] = []
        for p in plan.points:
            if p.is_finished():
                records[p.name] = read_status(p.work_dir)
                if records[p.name].get("status") != "done":  # e.g. the sweep died before recording it
                    records[p.name] = _record(p, status="done", note="finished by an earlier run")
                echo(f"[sweep] {p.name}: finished earlier, skipped")
            else:
                pending.append(p)
        echo(f"[sweep] {len(plan.points)} points ({len(pending)} to run) in {plan.sweep_dir}; stage outputs to "
             f"compute: {', '.join(f'{s} x{n}' for s, n in plan.runs_per_stage().items())}")
        running: dict[str, _Running] = {}
        failed_keys: dict[str, str] = {}  # shared stage folder -> the point it failed in
        free = list(range(len(slots)))
        try:
            while pending or running:
                for name, r in list(running.items()):
                    if r.proc.poll() is None:
                        continue
                    del running[name]
                    free.append(r.slot)
                    records[name] = _finish(r, failed_keys, echo)
                still: list[Point] = []
                for p in pending:
                    needs = set(p.pending_stages())
                    blocked = sorted(k for k in needs if k in failed_keys)
                    if blocked:
                        src = failed_keys[blocked[0]]
                        records[p.name] = _record(p, status="upstream_failed",
                                                  error=f"stage folder {blocked[0]} failed in point {src} "
                                                        f"(see {plan.sweep_dir / src / LOG_FILE})")
                        echo(f"[sweep] {p.name}: not run, its stage {blocked[0]} failed in {src}")
                    elif free and not any(needs & r.needs for r in running.values()):
                        running[p.name] = _start(plan, p, free.pop(0), slots, needs, echo)
                    else:
                        still.append(p)
                pending = still
                if pending or running:
                    time.sleep(poll_s)
        except BaseException:
            for r in running.values():  # Ctrl-C / SIGTERM: stop the points (their stages resume next time)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(r.proc.pid, signal.SIGTERM)
            for r in running.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    r.proc.wait(timeout=30)
                _record(r.point, status="interrupted", pid=r.proc.pid)
            raise
    return {p.name: records.get(p.name, read_status(p.work_dir)) for p in plan.points}


def _start(plan: SweepPlan, p: Point, slot: int, slots: list[dict[str, str]], needs: set[str],
           echo: Callable[[str], None]) -> _Running:
    cmd = point_command(plan, p)
    env = {**os.environ, **slots[slot], "PYTHONUNBUFFERED": "1"}
    with open(p.work_dir / LOG_FILE, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent())
    devices = ",".join(f"{k}={v}" for k, v in slots[slot].items() if k.endswith("VISIBLE_DEVICES") or k == "TPU_VISIBLE_CHIPS")
    _record(p, status="running", pid=proc.pid, command=cmd, devices=slots[slot])
    echo(f"[sweep] {p.name}: started (pid {proc.pid}{', ' + devices if devices else ''}); log {p.work_dir / LOG_FILE}")
    return _Running(p, proc, slot, needs, time.time())


def _finish(r: _Running, failed_keys: dict[str, str], echo: Callable[[str], None]) -> dict[str, Any]:
    p, rc, wall = r.point, r.proc.returncode, round(time.time() - r.t0, 1)
    if rc == 0 and p.is_finished():
        echo(f"[sweep] {p.name}: done in {wall:.0f} s")
        return _record(p, status="done", returncode=0, wall_s=wall)
    tail = _tail(p.work_dir / LOG_FILE)
    stuck = p.pending_stages()
    for key in stuck[:1]:  # the first unfinished stage is where it failed; the later ones never started
        failed_keys.setdefault(key, p.name)
    err = error_line(tail) if rc != 0 else f"exited 0 but stage folders {stuck} are not finished"
    echo(f"[sweep] {p.name}: FAILED (exit {rc}) in {stuck[0] if stuck else '?'}: {err}")
    return _record(p, status="failed", returncode=rc, wall_s=wall, failed_stage=stuck[0] if stuck else None,
                   error=err, traceback_tail=tail)
