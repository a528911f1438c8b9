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

A worker process (the loop it runs, and starting, killing and stopping it) is `rwml_jax.envs.pool_worker`.
This module is the one class EnvPool, kept whole because its round scheduler (`_exchange`) and its slot
bookkeeping read and update the same slot -> worker map, preload mirror and cost estimates.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rwml_jax.envs.base import StepResult, TaskSpec
from rwml_jax.envs.pool_worker import (
    MAX_PRELOADED_PER_WORKER,
    WORKER_GC_THRESHOLDS,
    EnvFactory,
    RemoteError,
    WorkerProcess,
    close_workers,
    resolve_factory,
    start_workers,
)

__all__ = ["MAX_PRELOADED_PER_WORKER", "PRELOAD_MIN_REMAINING", "WORKER_GC_THRESHOLDS", "EnvFactory", "EnvPool",
           "EnvWorkerError", "resolve_factory"]

# One request to a worker: (key, operation, argument); key >= 0 is a slot, < 0 a pool-internal extra.
_Item = tuple[int, str, Any]

# An idle worker preloads only while the busiest other worker is expected to need at least this fraction of a
# preload's time more: a preload may lengthen the round by the rest, and takes (reset - warm_reset) off a later one.
PRELOAD_MIN_REMAINING = 0.75
# Initial cost estimates (CPU seconds) per request kind, refined by running means of measured times.
# A preload is costed as the difference (reset - warm_reset): the part of a reset it takes off a later round.
_INITIAL_COSTS = {"reset": 1.0, "warm_reset": 0.3, "step": 0.1}


def _error_result(message: str) -> StepResult:
    return StepResult(observation="", done=False, truncated=True, valid=False, info={"error": message})


class EnvWorkerError(RuntimeError):
    """A worker could not be started (bad factory, import error) or keeps failing."""


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
        self._workers: list[WorkerProcess | None] = [None] * num_workers
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
        try:
            self._start_workers({w: [s for s in range(num_envs) if s % num_workers == w] for w in range(num_workers)})
        except BaseException:
            self.close()
            raise
        # Runs when the pool is garbage-collected or at interpreter exit, whichever comes first (it holds
        # the worker list, not the pool).
        self._finalizer = weakref.finalize(self, close_workers, self._workers)

    # ------------------------------------------------------------------ lifecycle

    def _start_workers(self, slots_of: Mapping[int, list[int]]) -> None:
        """Start worker i for the slots `slots_of[i]`, concurrently, and wait until each has built its envs."""
        started, error = start_workers(self._ctx, slots_of, self.factory, self.factory_kwargs,
                                       self._die_with_parent, self.start_timeout)
        for i, w in started.items():
            self._workers[i] = w
        if error:
            raise EnvWorkerError(error)

    def _restart(self, index: int, why: str) -> None:
        """Kill worker `index` (if alive) and start a fresh one; its running episodes become lost."""
        old = self._workers[index]
        assert old is not None
        old.kill()
        self.restarts += 1
        hosted = [s for s in range(self.num_envs) if self._home[s] == index]
        for s in hosted:
            if self._slots[s].running:
                self._slots[s].lost = why
        self._preloaded[index] = []
        self._drops[index] = []
        self._start_workers({index: hosted})

    def close(self) -> None:
        """Stop every worker (polite close, then terminate, then kill). Idempotent."""
        if self._closed:
            return
        self._closed = True
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()  # calls close_workers once
        else:
            close_workers(self._workers)

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
        bad: list[tuple[int, RemoteError]] = []
        for i in sorted(raw):  # slot order, not answer order: episode counters must not depend on timing
            res = raw[i]
            slot = self._slots[i]
            cmd, arg = requests[i]
            if cmd == "reset":
                slot.task, slot.step, slot.lost = arg, 0, None
                slot.episode_id = f"{self._run_tag}-{next(self._episode_counter):07d}"
                if isinstance(res, RemoteError):
                    slot.running = False
                    bad.append((i, res))
                    continue
            else:
                slot.step += 1
                if isinstance(res, RemoteError):
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
        if isinstance(res, RemoteError):
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
        answers; restart crashed / hung workers. Returns slot -> StepResult | RemoteError (| anything for
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
                self._fail_worker(w, items, f"{worker.death_reason()} before the request", results)
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
                        failure = w.death_reason()
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
                    failure = w.death_reason()
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
            if isinstance(res, RemoteError):
                continue
            if cmd not in ("reset", "step"):
                continue  # preloads are costed as reset - warm_reset; drops and calls are negligible
            kind = "warm_reset" if cmd == "reset" and key in self._warm_slots else cmd
            self._cost_sum[kind] += cpu
            self._cost_n[kind] += 1.0

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
