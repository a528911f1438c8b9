"""One worker process of `rwml_jax.envs.pool.EnvPool`: the loop it runs and the pool's handle on it.

Inside the process, `worker_main` builds one environment per slot it hosts, then answers the pool's batched
requests (reset, step, preload, ...) in order, timing each with the process CPU clock; an exception an
environment raises goes back as a `RemoteError` (with its traceback) instead of ending the worker. In the
pool's process, `WorkerProcess` / `start_workers` / `close_workers` start a worker and wait until it is
ready, kill it, stop it, and say why it died. Scheduling rounds, timeouts and restarts are in
`rwml_jax.envs.pool`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.process
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rwml_jax.envs.base import StepResult, TaskSpec, TextEnv

# An environment factory: an import path "package.module:callable" (recommended: always importable in a
# fresh worker), or a picklable module-level callable. Called as factory(**factory_kwargs) -> TextEnv.
EnvFactory = str | Callable[..., TextEnv]

WORKER_GC_THRESHOLDS = (20_000, 20, 20)  # gc.set_threshold in worker processes (CPython default 700, 10, 10)
MAX_PRELOADED_PER_WORKER = 2  # spare preloaded envs a worker keeps (oldest evicted first)


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
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def worker_main(conn: multiprocessing.connection.Connection, factory: EnvFactory,
                 factory_kwargs: dict[str, Any], slots: list[int], die_with_parent: bool) -> None:
    """Worker loop: build one env per slot, then answer ("batch", [(key, op, arg)]) messages with
    ("ok", [(key, StepResult | RemoteError | None, CPU seconds), ...], CPU seconds spent) in request order.

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
        conn.send(("fail", RemoteError.capture(e)))
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

    def do(item: tuple[int, str, Any]) -> tuple[int, Any, float]:
        slot, op, arg = item
        t0 = time.thread_time()
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
            res = RemoteError.capture(e)
            drop(slot)
        return (slot, res, time.thread_time() - t0)

    # envs that wait on a server in the main process step in threads (see `_threaded`)
    concurrent = any(getattr(e, "concurrent_steps", False) for e in envs.values())
    threads = ThreadPoolExecutor(64, thread_name_prefix="env") if concurrent else None  # kept: one connection each
    while True:
        try:
            cmd, payload = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            break
        if cmd == "close":
            break
        cpu0 = time.process_time()
        if concurrent and sum(op in ("reset", "step") for _, op, _ in payload) > 1:
            out = _threaded(payload, do, threads)
        else:
            out = [do(item) for item in payload]
        try:
            conn.send(("ok", out, time.process_time() - cpu0))
        except (BrokenPipeError, OSError):
            break
    if threads is not None:
        threads.shutdown(wait=False)
    for slot in list(envs):
        drop(slot)
    for _task, env in spares:
        close_env(env)
    conn.close()


def _threaded(payload: list[tuple[int, str, Any]], do: Callable[[tuple[int, str, Any]], Any],
              threads: ThreadPoolExecutor) -> list[Any]:
    """Run a batch's resets and steps in one thread each (other operations first, in order); results in
    request order. For envs that wait on a server in the main process (`Tau2Env.concurrent_steps`)."""
    out: list[Any] = [None] * len(payload)
    parallel = [k for k, (_, op, _) in enumerate(payload) if op in ("reset", "step")]
    for k, item in enumerate(payload):
        if k not in parallel:
            out[k] = do(item)
    for k, res in zip(parallel, threads.map(do, [payload[k] for k in parallel])):
        out[k] = res
    return out




@dataclasses.dataclass
class RemoteError:
    """An exception raised in a worker, carried back with its traceback (the exception itself if picklable)."""

    type_name: str
    message: str
    traceback: str
    exc: BaseException | None

    @classmethod
    def capture(cls, e: BaseException) -> RemoteError:
        try:
            pickle.loads(pickle.dumps(e))
            exc: BaseException | None = e
        except Exception:
            exc = None
        return cls(type(e).__name__, str(e), traceback.format_exc(), exc)

    def describe(self) -> str:
        return f"{self.type_name}: {self.message}"


# ---------------------------------------------------------------------------------------------------
# The pool's side: a handle on one worker process
# ---------------------------------------------------------------------------------------------------

_SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}


@dataclasses.dataclass
class WorkerProcess:
    """The pool's handle on worker process `index`: its process, the parent's end of its pipe, and its pid
    once it has answered "ready" (-1 before)."""

    index: int
    slots: list[int]
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    pid: int = -1

    def death_reason(self) -> str:
        """Why the (exited) process ended: the signal that killed it, or its exit code."""
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"died from signal {_SIGNAL_NAMES.get(-code, -code)}"
        return f"exited unexpectedly (exit code {code})"

    def kill(self) -> None:
        """SIGKILL the process (if alive), reap it and close the pipe."""
        try:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)
        except (AssertionError, ValueError):  # not started / already closed
            pass
        try:
            self.conn.close()
        except OSError:
            pass


def spawn_worker(ctx: multiprocessing.context.BaseContext, index: int, slots: list[int], factory: EnvFactory,
                 factory_kwargs: dict[str, Any], die_with_parent: bool) -> WorkerProcess:
    """Start worker process `index` running `worker_main` for `slots` (it answers "ready" when its envs exist)."""
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=worker_main, name=f"rwml-env-worker-{index}", daemon=True,
        args=(child_conn, factory, factory_kwargs, slots, die_with_parent))
    proc.start()
    child_conn.close()
    return WorkerProcess(index=index, slots=slots, process=proc, conn=parent_conn)


def start_workers(ctx: multiprocessing.context.BaseContext, slots_of: Mapping[int, list[int]], factory: EnvFactory,
                  factory_kwargs: dict[str, Any], die_with_parent: bool,
                  timeout: float) -> tuple[dict[int, WorkerProcess], str | None]:
    """Start worker i for the slots `slots_of[i]`, all concurrently, and wait up to `timeout` seconds until
    each has built its envs. Returns (index -> handle of every worker started, error): error is None when
    all are ready, else what went wrong first (the caller owns the handles either way and must close them)."""
    started = {i: spawn_worker(ctx, i, slots, factory, factory_kwargs, die_with_parent)
               for i, slots in slots_of.items()}
    deadline = time.monotonic() + timeout
    waiting = dict(started)
    error: str | None = None
    while waiting:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            error = f"worker(s) {sorted(waiting)} did not start within {timeout:.0f} s"
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
                    error = _startup_death(ctx, i, w)
                break
            if w.process.sentinel in ready:
                w.process.join(1)
                error = _startup_death(ctx, i, w)
                break
        if error:
            break
    return started, error


def _startup_death(ctx: multiprocessing.context.BaseContext, i: int, w: WorkerProcess) -> str:
    msg = f"worker {i} exited during start-up (exit code {w.process.exitcode}); see its traceback above."
    if ctx.get_start_method() in ("spawn", "forkserver"):
        msg += (f" With the {ctx.get_start_method()!r} start method the worker re-imports your main "
                f"script: guard its top-level code with `if __name__ == '__main__':`.")
    return msg


def close_workers(workers: Sequence[WorkerProcess | None]) -> None:
    """Stop the worker processes: ask each to close, wait up to 5 s in all, then terminate, then kill."""
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
