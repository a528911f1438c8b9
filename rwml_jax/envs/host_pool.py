"""Environments of a multi-process run: each host steps its share of the slots in its own worker pool.

In a multi-process JAX run (a TPU pod slice, a GPU cluster) every process drives the same rollout: the
same live episodes, the same prompts, one global sampler call per turn. `HostShardedPool` keeps that
schedule but splits the environment work: slot i of the pool lives on process i % P (in that host's own
`EnvPool` of worker processes), each process resets / steps only its slots, and the results of every
round are exchanged (`rwml_jax.sharding.allgather_objects`), so every process sees every slot's result,
exactly as one pool of all slots would give them. Episode ids are numbered across all slots in slot order,
as one pool numbers them, so outputs do not depend on the process count.

`host_pool(...)` is the one constructor the stages use: a plain `EnvPool` with one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from rwml_jax import sharding as sh
from rwml_jax.envs.base import StepResult, TaskSpec
from rwml_jax.envs.pool import EnvPool


class HostShardedPool:
    """The batch API of `EnvPool` (reset / step / advance over `num_envs` slots) over P processes."""

    def __init__(self, factory: Any, num_envs: int, num_workers: int | None, *, process_index: int,
                 process_count: int, exchange: Callable[[Any], list[Any]], run_tag: str = "pool", **pool_kw: Any):
        self.num_envs, self.p, self.n = num_envs, process_index, process_count
        self.mine = list(range(process_index, num_envs, process_count))  # global slots this process hosts
        self._exchange = exchange
        self._tag = run_tag
        self._count = 0
        self._ids: dict[int, str] = {}
        self.pool = EnvPool(factory, num_envs=max(1, len(self.mine)),
                            num_workers=max(1, min(num_workers or len(self.mine), len(self.mine))),
                            run_tag=f"{run_tag}-p{process_index}", **pool_kw) if self.mine else None

    def __enter__(self) -> HostShardedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def reset(self, tasks: Sequence[TaskSpec | None], upcoming: Sequence[TaskSpec] | None = None) -> list[StepResult | None]:
        return self.advance(tasks, upcoming)

    def step(self, actions: Sequence[str | None], upcoming: Sequence[TaskSpec] | None = None) -> list[StepResult | None]:
        return self.advance(actions, upcoming)

    def advance(self, items: Sequence[TaskSpec | str | None],
                upcoming: Sequence[TaskSpec] | None = None) -> list[StepResult | None]:
        """One round over every process's slots; the result of slot i as `EnvPool.advance` gives it."""
        if len(items) > self.num_envs:
            raise ValueError(f"got {len(items)} items for a pool of {self.num_envs} envs")
        local: dict[int, Any] = {}
        error: BaseException | None = None
        if self.pool is not None:
            mine = [items[i] if i < len(items) else None for i in self.mine]
            try:
                got = self.pool.advance(mine, upcoming) if any(x is not None for x in mine) else []
                local = {self.mine[j]: r for j, r in enumerate(got) if r is not None}
            except Exception as e:  # noqa: BLE001  (raised below on every process, after the exchange)
                error = e
        gathered = self._exchange((local, None if error is None else repr(error)))
        failures = [f"process {k}: {err}" for k, (_, err) in enumerate(gathered) if err is not None]
        if failures:
            if error is not None:
                raise error
            raise RuntimeError("environments of another process failed: " + "; ".join(failures))
        out: list[StepResult | None] = [None] * len(items)
        for results, _ in gathered:
            for i, r in results.items():
                out[i] = r
        for i, item in enumerate(items):  # episode ids numbered over all slots in slot order, as one pool does
            if isinstance(item, TaskSpec):
                self._ids[i] = f"{self._tag}-{self._count:07d}"
                self._count += 1
            if out[i] is not None:
                out[i].info["episode_id"], out[i].info["slot"] = self._ids.get(i), i
        return out


def host_pool(factory: Any, num_envs: int, num_workers: int | None = None, *, run_tag: str | None = None,
              **kw: Any) -> Any:
    """An `EnvPool` (one process) or a `HostShardedPool` (several; `run_tag` must then be the same on every
    process, default "pool"): use as a context manager."""
    if jax.process_count() == 1:
        return EnvPool(factory, num_envs=num_envs, num_workers=num_workers, run_tag=run_tag, **kw)
    return HostShardedPool(factory, num_envs, num_workers, process_index=jax.process_index(),
                           process_count=jax.process_count(), exchange=sh.allgather_objects,
                           run_tag=run_tag or "pool", **kw)
