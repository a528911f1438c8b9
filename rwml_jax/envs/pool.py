"""A pool of text environments living in worker processes, stepped as one batch.

The pool owns `num_envs` *slots*. Each worker process holds the environments of the slots it hosts and steps
them one after another, while the workers run concurrently. The caller sees a batch API:

    with EnvPool("rwml_jax.envs.alfworld_env:AlfworldEnv", num_envs=8, num_workers=2,
                 factory_kwargs={"data_dir": "..."}) as pool:
        first = pool.reset([TaskSpec("alfworld", "valid_seen", gid) for gid in game_ids])  # 8 StepResults
        nxt = pool.step(["go to desk 1", None, ...])   # None: slot idle / finished -> result None

Load balancing (rounds are lockstep, so a round lasts as long as its busiest worker, and resets cost
several times a step and vary unpredictably: an ALFWorld game load is ~0.5-2 s, a step ~0.05 s):
- placement: slot i starts in worker i % num_workers. Steps go to the worker hosting their slot; a *reset*
  may run on any worker (the slot's environment moves with it; its steps then go there until the next
  reset). Each worker starts a round with its steps plus half of its share of the resets (shares by
  estimated cost); the other resets of the round are handed out in shrinking chunks, down to one, to
  whichever worker answers first (guided self-scheduling), so a slow game load delays its own worker's
  queue, not the round. Estimates are running means of the CPU time each kind of request took.
- preloading: callers may pass `upcoming` tasks (the next ones they will reset). A worker that has
  finished its share while another is still busy (by the estimates, for at least
  PRELOAD_MIN_REMAINING of a preload) loads the next upcoming game into a spare environment
  (`TextEnv.preload`, optional); the reset of that task is then bound to that worker, where it only
  restarts the loaded game. Hints are never required: a wrong or missing hint only costs the preload.

Failure handling (the point of running the engines out of process):
- an environment that *raises* during `step` ends its episode: the result is `truncated=True` with
  `info["error"]` holding the exception, and that slot's environment is rebuilt; other slots are untouched.
- a worker that *dies* (segfault, OOM kill, SIGKILL) or does not answer within the timeout (a hung engine) is
  killed and restarted with fresh environments. Every episode it hosted is truncated: the slots in the
  failing call get a truncated result now, its other running slots get one on their next `step`.
  `info["error"]` says what happened. Nothing is dropped silently.
- `reset` errors caused by bad input (unknown task id, missing data) are raised in the caller.

Workers are started with the "spawn" start method by default (set `mp_context="forkserver"` to share the
import cost; either way a script using the pool needs an `if __name__ == "__main__":` guard), ignore SIGINT
(Ctrl-C reaches the parent, whose context manager shuts them down), are daemonic, die with their parent
(PR_SET_PDEATHSIG on Linux for spawned workers of a pool made on the main thread; EOF on the pipe otherwise)
and are closed at interpreter exit, so no orphan processes remain.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import importlib
import itertools
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from rwml_jax.envs.base import StepResult, TaskSpec, TextEnv

# An environment factory: an import path "package.module:callable" (recommended: always importable in a
# fresh worker), or a picklable module-level callable. Called as factory(**factory_kwargs) -> TextEnv.
EnvFactory = str | Callable[..., TextEnv]
# One request to a worker: (key, operation, argument); key >= 0 is a slot, < 0 a pool-internal extra.
_Item = tuple[int, str, Any]

_SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}
WORKER_GC_THRESHOLDS = (20_000, 20, 20)  # gc.set_threshold in worker processes (CPython default 700, 10, 10)
MAX_PRELOADED_PER_WORKER = 2  # spare preloaded envs a worker keeps (oldest evicted first)
# An idle worker preloads only while the busiest other worker is expected to need at least this fraction of a
# preload's time more: a preload may lengthen the round by the rest, and takes (reset - warm_reset) off a later one.
PRELOAD_MIN_REMAINING = 0.75
# Initial cost estimates (CPU seconds) per request kind, refined by running means of measured times.
# A preload is costed as the difference (reset - warm_reset): the part of a reset it takes off a later round.
_INITIAL_COSTS = {"reset": 1.0, "warm_reset": 0.3, "step": 0.1}


def resolve_factory(factory: EnvFactory) -> Callable[..., TextEnv]:
    """Turn an import path "pkg.mod:name" (or "pkg.mod.name") into the callable it names."""
    if callable(factory):
        return factory
    if not isinstance(factory, str) or not factory:
        raise TypeError(f"env factory must be a callable or an import path string, got {factory!r}")
    mod_name, sep, attr = factory.partition(":")
    if not sep:
        mod_name, _, attr = factory.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"env factory import path {factory!r} must look like 'package.module:callable'")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import env factory {factory!r}: {e}") from e
    if not callable(obj):
        raise TypeError(f"env factory {factory!r} is not callable")
    return obj


def _set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a hung env never reads its pipe's EOF)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def _error_result(message: str) -> StepResult:
    return StepResult(observation="", done=False, truncated=True, valid=False, info={"error": message})


def _worker_main(conn: multiprocessing.connection.Connection, factory: EnvFactory,
                 factory_kwargs: dict[str, Any], slots: list[int], die_with_parent: bool) -> None:
    """Worker loop: build one env per slot, then answer ("batch", [(key, op, arg)]) messages with
    ("ok", [(key, StepResult | _RemoteError | None, CPU seconds), ...], CPU seconds spent) in request order.

    op is "reset" / "step" / "call" (key: the slot), "drop" (key < 0, arg: a slot that moved to another
    worker: close its env here) or "preload" (key < 0, arg: a TaskSpec to load into a spare env; a later
    "reset" of the same task in this worker uses that env) or "unload" (key < 0: close that spare).
    Exits on ("close", None) or when the parent's end of the pipe closes (EOF).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if die_with_parent:
        _set_parent_death_signal()
    envs: dict[int, TextEnv] = {}
    try:
        make = resolve_factory(factory)
        for slot in slots:
            envs[slot] = make(**factory_kwargs)
    except BaseException as e:  # report and exit: the parent raises it
        conn.send(("fail", _RemoteError.capture(e)))
        conn.close()
        return
    # Engines such as ALFWorld's build hundreds of thousands of objects per reset; with the default
    # thresholds the cyclic collector runs several full collections per reset (~30 % of a worker's time).
    # Freeze what start-up built and collect the young generations less often.
    gc.freeze()
    gc.set_threshold(*WORKER_GC_THRESHOLDS)
    conn.send(("ready", os.getpid()))

    spares: list[tuple[TaskSpec, TextEnv]] = []  # preloaded, oldest first (the parent mirrors this list)

    def env_for(slot: int) -> TextEnv:
        if slot not in envs:  # rebuilt after an exception, or the slot moved here
            envs[slot] = make(**factory_kwargs)
        return envs[slot]

    def close_env(env: TextEnv) -> None:
        try:
            env.close()
        except Exception:
            pass

    def reset(slot: int, task: TaskSpec) -> StepResult:
        for k, (t, env) in enumerate(spares):
            if t == task:
                del spares[k]
                old = envs.pop(slot, None)
                if old is not None:
                    close_env(old)
                envs[slot] = env
                break
        return env_for(slot).reset(task)

    def preload(task: TaskSpec) -> bool:
        """Load `task` into a spare env; False (nothing kept) when the env type has no `preload`."""
        env = make(**factory_kwargs)
        hook = getattr(env, "preload", None)
        if hook is None:
            close_env(env)
            return False
        try:
            hook(task)
        except Exception:
            close_env(env)  # a bad hint: the real reset will raise, with the caller's context
            env = make(**factory_kwargs)
        spares.append((task, env))
        while len(spares) > MAX_PRELOADED_PER_WORKER:
            close_env(spares.pop(0)[1])
        return True

    def unload(task: TaskSpec) -> None:
        for k, (t, env) in enumerate(spares):
            if t == task:
                close_env(spares.pop(k)[1])
                return

    def drop(slot: int) -> None:
        env = envs.pop(slot, None)
        if env is not None:
            try:
                env.close()
            except Exception:
                pass

    while True:
        try:
            cmd, payload = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            break
        if cmd == "close":
            break
        cpu0 = time.process_time()
        out: list[tuple[int, Any, float]] = []
        for slot, op, arg in payload:  # cmd == "batch"
            t0 = time.process_time()
            try:
                if op == "reset":
                    res: Any = reset(slot, arg)
                elif op == "step":
                    res = env_for(slot).step(arg)
                elif op == "call":  # test / debugging hook: (method name, args)
                    res = getattr(env_for(slot), arg[0])(*arg[1])
                elif op == "drop":
                    res = drop(arg)
                elif op == "preload":
                    res = preload(arg)
                elif op == "unload":
                    res = unload(arg)
                else:
                    raise ValueError(f"unknown pool operation {op!r}")
            except Exception as e:
                res = _RemoteError.capture(e)
                drop(slot)
            out.append((slot, res, time.process_time() - t0))
        try:
            conn.send(("ok", out, time.process_time() - cpu0))
        except (BrokenPipeError, OSError):
            break
    for slot in list(envs):
        drop(slot)
    for _task, env in spares:
        close_env(env)
    conn.close()


@dataclasses.dataclass
class _RemoteError:
    """An exception raised in a worker, carried back with its traceback (the exception itself if picklable)."""

    type_name: str
    message: str
    traceback: str
    exc: BaseException | None

    @classmethod
    def capture(cls, e: BaseException) -> _RemoteError:
        import pickle

        try:
            pickle.loads(pickle.dumps(e))
            exc: BaseException | None = e
        except Exception:
            exc = None
        return cls(type(e).__name__, str(e), traceback.format_exc(), exc)

    def describe(self) -> str:
        return f"{self.type_name}: {self.message}"


class EnvWorkerError(RuntimeError):
    """A worker could not be started (bad factory, import error) or keeps failing."""


@dataclasses.dataclass
class _Worker:
    index: int
    slots: list[int]
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    pid: int = -1


@dataclasses.dataclass
class _Slot:
    task: TaskSpec | None = None
    episode_id: str | None = None
    step: int = 0
    running: bool = False
    lost: str | None = None  # why the running episode was lost (its worker was restarted)


class EnvPool:
    """`num_envs` text environments in `num_workers` processes, reset and stepped as a batch.

    Args:
      factory: import path "pkg.mod:callable" or a picklable module-level callable returning a `TextEnv`.
      num_envs: number of slots (parallel episodes).
      num_workers: worker processes (default min(num_envs, os.cpu_count())). Slot i starts in worker
        i % num_workers; resets may move it (see "Load balancing" above).
      factory_kwargs: keyword arguments for the factory (must be picklable).
      step_timeout: seconds one env may take for one `step` before its worker counts as hung; a worker
        stepping k of its envs in one call gets k * step_timeout.
      reset_timeout: the same for `reset` (loading a game is slower than stepping it).
      start_timeout: seconds a worker may take to start and build its envs.
      mp_context: multiprocessing start method, "spawn" (default) or "forkserver".
      balance: schedule resets on whichever worker is free and preload `upcoming` tasks (default); False
        keeps slot i in worker i % num_workers and ignores `upcoming` (the static layout, for comparison).
    """

    def __init__(self, factory: EnvFactory, num_envs: int, num_workers: int | None = None, *,
                 factory_kwargs: Mapping[str, Any] | None = None, step_timeout: float = 60.0,
                 reset_timeout: float = 120.0, start_timeout: float = 300.0,
                 mp_context: str = "spawn", balance: bool = True, run_tag: str | None = None) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        num_workers = min(num_envs, os.cpu_count() or 1) if num_workers is None else num_workers
        if not 1 <= num_workers <= num_envs:
            raise ValueError(f"num_workers must be in [1, num_envs={num_envs}], got {num_workers}")
        if mp_context not in ("spawn", "forkserver"):
            raise ValueError(f"mp_context must be 'spawn' or 'forkserver' (fork is unsafe with threads), "
                             f"got {mp_context!r}")
        if isinstance(factory, str):
            resolve_factory(factory)  # fail fast here, with a clear message, rather than in every worker
        self.factory = factory
        self.factory_kwargs = dict(factory_kwargs or {})
        self.num_envs = num_envs
        self.num_workers = num_workers
        self.step_timeout = float(step_timeout)
        self.reset_timeout = float(reset_timeout)
        self.start_timeout = float(start_timeout)
        self.balance = bool(balance)
        self._ctx = multiprocessing.get_context(mp_context)
        # PR_SET_PDEATHSIG fires when the *thread* that started the worker exits, so only use it for pools
        # made on the main thread (spawned workers are direct children; forkserver ones are not).
        self._die_with_parent = (mp_context == "spawn" and threading.current_thread() is threading.main_thread())
        self._slots = [_Slot() for _ in range(num_envs)]
        self._workers: list[_Worker | None] = [None] * num_workers
        self._episode_counter = itertools.count()
        if run_tag is not None and (not isinstance(run_tag, str) or not run_tag or any(ch.isspace() for ch in run_tag)):
            raise ValueError(f"run_tag must be a non-empty string without spaces, got {run_tag!r}")
        self._run_tag = run_tag or uuid.uuid4().hex[:6]
        self.restarts = 0  # how many times a worker was restarted (crash or hang)
        self.rounds = 0  # concurrent rounds (reset / step / advance calls that reached a worker)
        self.cpu_seconds = 0.0  # CPU time the workers spent on requests, summed over workers
        self.critical_cpu_seconds = 0.0  # per round the largest worker CPU time, summed over rounds
        self._closed = False
        self._home = [s % num_workers for s in range(num_envs)]  # slot -> worker hosting its env
        self._preloaded: list[list[TaskSpec]] = [[] for _ in range(num_workers)]  # mirrors the workers' spares
        self._drops: list[list[int]] = [[] for _ in range(num_workers)]  # slots that moved away, env still here
        self._cost_sum = {k: v for k, v in _INITIAL_COSTS.items()}  # running means: sum / count (count
        self._cost_n = {k: 1.0 for k in _INITIAL_COSTS}  # starts at 1 with the initial guess)
        self.preload_hits = 0  # resets served by a preloaded env
        self._warm_slots: set[int] = set()  # slots whose reset this round uses a preloaded env
        self._can_preload = True  # until a worker answers that its env type has no `preload`
        self.preloads = 0  # preloads requested
        slots_of = [[s for s in range(num_envs) if s % num_workers == w] for w in range(num_workers)]
        try:
            self._start_workers(list(range(num_workers)), slots_of)
        except BaseException:
            self.close()
            raise
        # Runs when the pool is garbage-collected or at interpreter exit, whichever comes first (it holds
        # the worker list, not the pool).
        self._finalizer = weakref.finalize(self, EnvPool._close_workers, self._workers)

    # ------------------------------------------------------------------ lifecycle

    def _spawn(self, index: int, slots: list[int]) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, name=f"rwml-env-worker-{index}", daemon=True,
            args=(child_conn, self.factory, self.factory_kwargs, slots, self._die_with_parent))
        proc.start()
        child_conn.close()
        return _Worker(index=index, slots=slots, process=proc, conn=parent_conn)

    def _start_workers(self, indices: list[int], slots_of: list[list[int]]) -> None:
        """Start the given workers concurrently and wait until each has built its envs."""
        started = {i: self._spawn(i, slots_of[i]) for i in indices}
        deadline = time.monotonic() + self.start_timeout
        waiting = dict(started)
        error: str | None = None
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = f"worker(s) {sorted(waiting)} did not start within {self.start_timeout:.0f} s"
                break
            ready = multiprocessing.connection.wait(
                [w.conn for w in waiting.values()] + [w.process.sentinel for w in waiting.values()],
                timeout=remaining)
            for i, w in list(waiting.items()):
                if w.conn in ready or w.conn.poll():
                    try:
                        kind, payload = w.conn.recv()
                    except (EOFError, OSError):
                        kind, payload = "dead", None
                    if kind == "ready":
                        w.pid = int(payload)
                        del waiting[i]
                        continue
                    if kind == "fail":
                        error = f"worker {i} could not build its environments: {payload.describe()}\n" \
                                f"{payload.traceback}"
                    else:
                        error = self._startup_death(i, w)
                    break
                if w.process.sentinel in ready:
                    w.process.join(1)
                    error = self._startup_death(i, w)
                    break
            if error:
                break
        for i, w in started.items():
            self._workers[i] = w
        if error:
            raise EnvWorkerError(error)

    def _startup_death(self, i: int, w: _Worker) -> str:
        msg = f"worker {i} exited during start-up (exit code {w.process.exitcode}); see its traceback above."
        if self._ctx.get_start_method() in ("spawn", "forkserver"):
            msg += (f" With the {self._ctx.get_start_method()!r} start method the worker re-imports your main "
                    f"script: guard its top-level code with `if __name__ == '__main__':`.")
        return msg

    def _restart(self, index: int, why: str) -> None:
        """Kill worker `index` (if alive) and start a fresh one; its running episodes become lost."""
        old = self._workers[index]
        assert old is not None
        self._kill(old)
        self.restarts += 1
        hosted = [s for s in range(self.num_envs) if self._home[s] == index]
        for s in hosted:
            if self._slots[s].running:
                self._slots[s].lost = why
        self._preloaded[index] = []
        self._drops[index] = []
        self._start_workers([index], [hosted if i == index else [] for i in range(self.num_workers)])

    @staticmethod
    def _kill(w: _Worker) -> None:
        try:
            if w.process.is_alive():
                w.process.kill()
            w.process.join(5)
        except (AssertionError, ValueError):  # not started / already closed
            pass
        try:
            w.conn.close()
        except OSError:
            pass

    @staticmethod
    def _close_workers(workers: list[_Worker | None]) -> None:
        for w in workers:
            if w is None:
                continue
            try:
                w.conn.send(("close", None))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5.0
        for w in workers:
            if w is None:
                continue
            try:
                w.process.join(max(0.0, deadline - time.monotonic()))
                if w.process.is_alive():
                    w.process.terminate()
                    w.process.join(2)
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join(2)
            except (AssertionError, ValueError):
                pass
            try:
                w.conn.close()
            except OSError:
                pass

    def close(self) -> None:
        """Stop every worker (polite close, then terminate, then kill). Idempotent."""
        if self._closed:
            return
        self._closed = True
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()  # calls _close_workers once
        else:
            EnvPool._close_workers(self._workers)

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ introspection

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes, by worker index."""
        return [w.pid if w is not None else -1 for w in self._workers]

    def cpu_stats(self) -> dict[str, float]:
        """Worker CPU accounting: "cpu_seconds" (all workers), "critical_cpu_seconds" (per round the busiest
        worker's CPU time, summed: the wall time the rounds would take on dedicated cores) and "rounds"."""
        return {"rounds": self.rounds, "cpu_seconds": self.cpu_seconds,
                "critical_cpu_seconds": self.critical_cpu_seconds}

    def worker_of(self, slot: int) -> int:
        """Index of the worker hosting `slot` now (a reset may move it)."""
        return self._home[slot]

    def cost_estimates(self) -> dict[str, float]:
        """Mean worker CPU seconds per request kind ("reset", "warm_reset" (of a preloaded game), "step",
        "preload", ...), from the requests answered so far, starting from rough initial guesses."""
        est = {k: self._cost_sum[k] / self._cost_n[k] for k in self._cost_sum}
        est["preload"] = max(est["reset"] - est["warm_reset"], 0.1 * est["reset"])
        return est

    def episode_id(self, slot: int) -> str | None:
        """Id of the episode currently (or last) run in `slot`."""
        return self._slots[slot].episode_id

    # ------------------------------------------------------------------ batch API

    def reset(self, tasks: Sequence[TaskSpec | None],
              upcoming: Sequence[TaskSpec] | None = None) -> list[StepResult | None]:
        """Start `tasks[i]` in slot i (None: leave slot i alone; its result is None).

        upcoming: optional hint, the tasks the caller expects to reset next (in order); workers that
        finish their share of the round early preload them (see "Load balancing").

        Returns the first observation of every started episode; each result's info carries "episode_id",
        "slot" and "step". Raises the adapter's exception (e.g. ValueError for an unknown task id) if a slot
        cannot be reset; a worker crash or hang during reset gives that slot a truncated result instead.
        """
        for i, t in enumerate(tasks):
            if t is not None and not isinstance(t, TaskSpec):
                raise TypeError(f"tasks[{i}] must be a TaskSpec or None, got {type(t).__name__}")
        return self.advance(tasks, upcoming)

    def step(self, actions: Sequence[str | None],
             upcoming: Sequence[TaskSpec] | None = None) -> list[StepResult | None]:
        """Step slot i with `actions[i]` (None: idle, result None). All workers step concurrently.
        `upcoming`: as in `reset`.

        A slot whose episode was lost to a worker restart answers truncated=True with info["error"].
        Stepping a slot with no running episode (never reset, or already done) raises ValueError.
        """
        for i, a in enumerate(actions):
            if a is not None and not isinstance(a, str):
                raise TypeError(f"actions[{i}] must be a str or None, got {type(a).__name__}")
        return self.advance(actions, upcoming)

    def advance(self, items: Sequence[TaskSpec | str | None],
                upcoming: Sequence[TaskSpec] | None = None) -> list[StepResult | None]:
        """One concurrent round: slot i is reset if items[i] is a TaskSpec, stepped if it is an action
        string, left idle (result None) if None. Lets a rollout restart finished slots while the others
        step, instead of waiting for the resets in a separate round. Same rules as `reset` and `step`;
        `upcoming` as in `reset`.
        """
        self._check_open()
        if len(items) > self.num_envs:
            raise ValueError(f"got {len(items)} items for a pool of {self.num_envs} envs")
        out: list[StepResult | None] = [None] * len(items)
        requests: dict[int, tuple[str, Any]] = {}
        for i, item in enumerate(items):
            if item is None:
                continue
            if isinstance(item, TaskSpec):
                requests[i] = ("reset", item)
                continue
            if not isinstance(item, str):
                raise TypeError(f"items[{i}] must be a TaskSpec, a str or None, got {type(item).__name__}")
            slot = self._slots[i]
            if slot.lost is not None:
                out[i] = self._annotate(i, _error_result(slot.lost))
                slot.running, slot.lost = False, None
                continue
            if not slot.running:
                state = "was never reset" if slot.task is None else "has finished its episode"
                raise ValueError(f"env slot {i} {state}; pass None for idle slots or reset it first")
            requests[i] = ("step", item)
        raw = self._exchange(requests, upcoming)
        bad: list[tuple[int, _RemoteError]] = []
        for i in sorted(raw):  # slot order, not answer order: episode counters must not depend on timing
            res = raw[i]
            slot = self._slots[i]
            cmd, arg = requests[i]
            if cmd == "reset":
                slot.task, slot.step, slot.lost = arg, 0, None
                slot.episode_id = f"{self._run_tag}-{next(self._episode_counter):07d}"
                if isinstance(res, _RemoteError):
                    slot.running = False
                    bad.append((i, res))
                    continue
            else:
                slot.step += 1
                if isinstance(res, _RemoteError):
                    res = _error_result(f"environment raised during step: {res.describe()}\n{res.traceback}")
            slot.running = not (res.done or res.truncated)
            out[i] = self._annotate(i, res)
        if bad:
            i, err = bad[0]
            if err.exc is not None:
                err.exc.add_note(f"(raised in the pool worker of env slot {i} resetting {requests[i][1]}; "
                                 f"remote traceback:)\n{err.traceback}")
                raise err.exc
            raise RuntimeError(f"env slot {i} could not reset task {requests[i][1]}: {err.describe()}\n"
                               f"{err.traceback}")
        return out

    def call(self, slot: int, method: str, *args: Any) -> Any:
        """Call `env.method(*args)` on the env of `slot` in its worker (debugging / tests)."""
        self._check_open()
        res = self._exchange({slot: ("call", (method, args))})[slot]
        if isinstance(res, _RemoteError):
            raise RuntimeError(f"env slot {slot}.{method} raised {res.describe()}\n{res.traceback}")
        return res

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("EnvPool is closed")

    def _annotate(self, i: int, res: StepResult) -> StepResult:
        slot = self._slots[i]
        res.info.setdefault("episode_id", slot.episode_id)
        res.info.setdefault("slot", i)
        res.info.setdefault("step", slot.step)
        return res

    def _timeout(self, cmd: str) -> float:
        return self.reset_timeout if cmd in ("reset", "preload") else self.step_timeout

    def _move(self, slot: int, worker: int) -> None:
        """Host `slot` in `worker` from now on; its old worker closes the slot's env with its next message."""
        old = self._home[slot]
        if old != worker:
            self._drops[old].append(slot)
            self._home[slot] = worker

    def _plan(self, requests: Mapping[int, tuple[str, Any]]) -> tuple[dict[int, list[_Item]], list[_Item]]:
        """Split a round's requests into items bound to a worker and resets free to run on any worker.

        Steps and calls go to the worker hosting their slot; the reset of a task a worker has preloaded goes
        to that worker; the other resets are free when `balance` (else bound to the slot's worker). Returns
        (worker -> bound items, free items in request order)."""
        bound: dict[int, list[_Item]] = {}
        free: list[_Item] = []
        self._warm_slots = set()
        for i, (cmd, arg) in requests.items():
            w = self._home[i]
            if cmd == "reset" and self.balance:
                warm = [v for v in range(self.num_workers) if arg in self._preloaded[v]]
                if not warm:
                    free.append((i, cmd, arg))
                    continue
                w = warm[0]
                self._preloaded[w].remove(arg)
                self._warm_slots.add(i)
                self.preload_hits += 1
            bound.setdefault(w, []).append((i, cmd, arg))
        return bound, free

    def _item_cost(self, cost: Mapping[str, float], item: _Item) -> float:
        key, cmd, _arg = item
        if cmd == "reset" and key in self._warm_slots:
            return cost["warm_reset"]
        return cost.get(cmd, 0.0)

    def _next_preload(self, w: int, upcoming: Sequence[TaskSpec] | None, resetting: list[TaskSpec],
                      remaining: float, cost: Mapping[str, float], keys: Iterator[int]) -> list[_Item]:
        """Items that make idle worker `w` preload the next upcoming task nobody holds, when the busiest other
        worker is expected to need at least PRELOAD_MIN_REMAINING of a preload's time more (`remaining`,
        seconds); [] otherwise. Preloads of tasks that left the upcoming window are unloaded first."""
        if not (self.balance and upcoming and self._can_preload) or self.num_workers < 2:
            return []
        if remaining < PRELOAD_MIN_REMAINING * cost["preload"]:
            return []
        window = list(upcoming[: self.num_workers * MAX_PRELOADED_PER_WORKER])
        task = next((t for t in window if t not in resetting and not any(t in p for p in self._preloaded)), None)
        if task is None:
            return []
        items: list[_Item] = []
        held = self._preloaded[w]
        for stale in [t for t in held if t not in window]:
            items.append((next(keys), "unload", stale))
            held.remove(stale)
        if len(held) >= MAX_PRELOADED_PER_WORKER:
            return items
        held.append(task)
        self.preloads += 1
        return items + [(next(keys), "preload", task)]

    def _exchange(self, requests: Mapping[int, tuple[str, Any]],
                  upcoming: Sequence[TaskSpec] | None = None) -> dict[int, Any]:
        """Run one round: `requests` (slot -> (command, argument)) on the workers, concurrently; gather the
        answers; restart crashed / hung workers. Returns slot -> StepResult | _RemoteError (| anything for
        "call"); slots of a crashed / hung worker get a truncated StepResult with info["error"].

        Scheduling (see "Load balancing"): every worker first gets its bound items plus half of its share
        of the free resets (shares by estimated cost); the other free resets are handed out in shrinking
        chunks (len(queue) // (2 * workers), at least one) to whichever worker answers first, so
        unpredictable load times even out within the round. A worker that answers when nothing is left
        preloads an upcoming task while the others finish. A message's deadline is the sum of its items'
        timeouts. Every reset moves its slot to the worker it is sent to.
        """
        bound, free = self._plan(requests)
        cost = self.cost_estimates()
        load = [sum(self._item_cost(cost, it) for it in bound.get(w, [])) for w in range(self.num_workers)]
        planned: dict[int, list[_Item]] = {}
        for item in free:  # greedy by estimate
            w = min(range(self.num_workers), key=lambda v: (load[v], v != self._home[item[0]]))
            load[w] += cost["reset"]
            planned.setdefault(w, []).append(item)
        first = {w: items[: (len(items) + 1) // 2] for w, items in planned.items()}  # half the share now
        sent_first = {it[0] for items in first.values() for it in items}
        queue: collections.deque[_Item] = collections.deque(it for it in free if it[0] not in sent_first)
        resetting = [arg for cmd, arg in requests.values() if cmd == "reset"]
        keys = itertools.count(-1, -1)
        results: dict[int, Any] = {}
        inflight: dict[int, tuple[list[_Item], float, float, float]] = {}  # items, sent at, limit s, estimate s
        round_cpu = [0.0] * self.num_workers

        def send(w: int, items: list[_Item]) -> None:
            for slot, cmd, _arg in items:
                if cmd == "reset":
                    self._move(slot, w)
            items = [(next(keys), "drop", s) for s in self._drops[w]] + items
            self._drops[w] = []
            limit = max(self.step_timeout, sum(self._timeout(cmd) for _, cmd, _ in items if cmd != "drop"))
            worker = self._workers[w]
            assert worker is not None
            now = time.monotonic()
            try:
                worker.conn.send(("batch", items))
            except (BrokenPipeError, OSError):
                worker.process.join(1)
                self._fail_worker(w, items, f"{self._death_reason(worker)} before the request", results)
                return
            inflight[w] = (items, now, limit, sum(self._item_cost(cost, it) for it in items))

        def refill(w: int) -> None:
            """Give worker `w`, which just answered, the next free reset, or else a preload."""
            if queue:  # shrinking chunks (guided self-scheduling): few messages, an even finish
                send(w, [queue.popleft() for _ in range(max(1, len(queue) // (2 * self.num_workers)))])
                return
            now = time.monotonic()
            remaining = max((est - (now - sent) for v, (_i, sent, _l, est) in inflight.items() if v != w),
                            default=0.0)
            items = self._next_preload(w, upcoming, resetting, remaining, cost, keys)
            if items:
                send(w, items)

        for w in range(self.num_workers):
            items = bound.get(w, []) + first.get(w, [])
            if items:
                send(w, items)
        for w in range(self.num_workers):  # idle workers (or one whose send failed) take queued resets too
            if w not in inflight and queue:
                refill(w)
        while inflight:
            timeout = max(0.0, min(sent + limit for _i, sent, limit, _e in inflight.values()) - time.monotonic())
            watch: list[Any] = []
            for w_idx in inflight:
                w = self._workers[w_idx]
                assert w is not None
                watch += [w.conn, w.process.sentinel]
            ready = multiprocessing.connection.wait(watch, timeout=timeout)
            for w_idx in list(inflight):
                w = self._workers[w_idx]
                assert w is not None
                items, sent, limit, _est = inflight[w_idx]
                failure: str | None = None
                if w.conn in ready or (w.process.sentinel in ready and w.conn.poll()):
                    try:
                        _kind, payload, cpu = w.conn.recv()
                    except (EOFError, OSError):
                        w.process.join(1)
                        failure = self._death_reason(w)
                    else:
                        for (key, cmd, arg), (_key, res, _cpu) in zip(items, payload):
                            if key >= 0:
                                results[key] = res
                            elif cmd == "preload" and res is False:  # this env type cannot preload
                                self._can_preload = False
                                if arg in self._preloaded[w_idx]:
                                    self._preloaded[w_idx].remove(arg)
                        self._learn_costs(items, payload)
                        round_cpu[w_idx] += cpu
                elif w.process.sentinel in ready:
                    w.process.join(1)
                    failure = self._death_reason(w)
                elif time.monotonic() >= sent + limit:
                    failure = f"did not answer within {limit:.1f} s (hung); killed"
                else:
                    continue  # still working
                del inflight[w_idx]
                if failure is not None:
                    self._fail_worker(w_idx, items, failure, results)
                refill(w_idx)
        if any(round_cpu) or results:
            self.rounds += 1
            self.cpu_seconds += sum(round_cpu)
            self.critical_cpu_seconds += max(round_cpu)
        return results

    def _learn_costs(self, items: list[tuple[int, str, Any]], payload: list[tuple[int, Any, float]]) -> None:
        for (key, cmd, arg), (_key, res, cpu) in zip(items, payload):
            if isinstance(res, _RemoteError):
                continue
            if cmd not in ("reset", "step"):
                continue  # preloads are costed as reset - warm_reset; drops and calls are negligible
            kind = "warm_reset" if cmd == "reset" and key in self._warm_slots else cmd
            self._cost_sum[kind] += cpu
            self._cost_n[kind] += 1.0

    @staticmethod
    def _death_reason(w: _Worker) -> str:
        code = w.process.exitcode
        if code is not None and code < 0:
            return f"died from signal {_SIGNAL_NAMES.get(-code, -code)}"
        return f"exited unexpectedly (exit code {code})"

    def _fail_worker(self, w_idx: int, items: list[tuple[int, str, Any]], reason: str,
                     results: dict[int, Any]) -> None:
        w = self._workers[w_idx]
        assert w is not None
        cmds = "/".join(sorted({cmd for i, cmd, _ in items if i >= 0})) or "/".join(sorted({c for _, c, _ in items}))
        hosted = [s for s in range(self.num_envs) if self._home[s] == w_idx]
        why = (f"env worker {w_idx} (pid {w.pid}, slots {hosted}) {reason} during {cmds}; "
               f"it was restarted and its episodes truncated")
        slots = [i for i, _, _ in items if i >= 0]
        # episodes this worker reset or stepped earlier in the same round are lost with it too
        slots += [s for s in hosted if isinstance(results.get(s), StepResult) and s not in slots]
        for i in slots:
            results[i] = _error_result(why)
        self._restart(w_idx, why)
        for i in slots:  # reported now; not again on the next step
            self._slots[i].lost = None
