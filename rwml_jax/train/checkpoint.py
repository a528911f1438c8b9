"""Training checkpoints: params, optimiser state, RNG keys, step and data cursor, with orbax.

Layout (one folder per stage, e.g. ``<work_dir>/rwml/checkpoints``)::

    checkpoints/
      40/                    # a committed step
        state/               # the array pytree (orbax StandardSave, OCDBT): params, opt_state, rng, ...
        meta/metadata        # JSON: step, data cursor, caller's `extra`, typed-key bookkeeping
        _CHECKPOINT_METADATA
      50.orbax-checkpoint-tmp/   # a save in flight (or one killed mid-write): never listed, never loaded

Atomicity guarantee. Orbax writes every item of a step into ``<step>.orbax-checkpoint-tmp`` and, once all
items are written, renames the folder to ``<step>`` (an atomic rename on POSIX file systems; on object stores
such as GCS orbax instead writes ``commit_success.txt`` last and only counts steps that have it). A step is
therefore either fully written or invisible: a process killed at any moment (SIGKILL, OOM killer, TPU
preemption) leaves at worst a tmp folder that `latest_step` ignores and the next `Checkpointer` on the
folder deletes, and the previous checkpoint stays intact. ``tests/test_checkpoint.py`` kills a saving
process at several moments and checks that whatever step is listed restores bit-exactly. (Power loss on a
file system without ordered metadata journaling is outside what a rename can promise.)

Saves are asynchronous by default: `save` returns once the arrays are copied to host memory, and the write
and commit happen in a background thread; the caller may update (and donate) the arrays right away. Call
`wait` (or `close`) before the process exits normally; `save` of the next step waits for the previous one.

Typed PRNG keys (``jax.random.key``) are stored as their ``key_data`` (uint32) and re-wrapped on restore with
the same implementation. Restoring into ``target_abstract`` (a pytree of ``jax.ShapeDtypeStruct`` with
``sharding=`` set, e.g. from ``jax.eval_shape`` + the mesh rules) places every array directly in that
sharding, which may differ from the sharding it was saved with (resharding on restore).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp

from rwml_jax import storage

log = logging.getLogger(__name__)

_STATE = "state"
_META = "meta"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, or does not match the structure it is restored into."""


# ------------------------------------------------------------------------------------------------
# Data cursor
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DataCursor:
    """Where a stage is in its data: epoch e visits examples in `order(n)`; `position` of them are done.

    The order of epoch e is a pure function of (seed, e), so a resumed run visits the same examples in the
    same order as an uninterrupted one.
    """

    epoch: int = 0
    position: int = 0  # examples consumed in the current epoch
    seed: int = 0  # permutation seed

    def order(self, n: int, shuffle: bool = True) -> np.ndarray:
        """The visiting order [n] int64 of the current epoch."""
        if not shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n).astype(np.int64)

    def next_batch(self, n: int, batch_size: int, *, drop_last: bool = True, shuffle: bool = True) -> np.ndarray:
        """Indices [batch_size] of the next batch, advancing the cursor (rolling into the next epoch when the
        current one has fewer than batch_size left and drop_last, or none left)."""
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"cannot draw batches of {batch_size} from {n} examples")
        left = n - self.position
        if left <= 0 or (drop_last and left < batch_size):
            self.epoch += 1
            self.position = 0
        idx = self.order(n, shuffle)[self.position:self.position + batch_size]
        self.position += len(idx)
        return idx

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataCursor:
        return cls(epoch=int(d["epoch"]), position=int(d["position"]), seed=int(d["seed"]))


# ------------------------------------------------------------------------------------------------
# Typed PRNG keys <-> uint32 key data
# ------------------------------------------------------------------------------------------------
def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _impl_name(x: Any) -> str:
    impl = jax.random.key_impl(x) if isinstance(x, jax.Array) else x.dtype._impl  # ShapeDtypeStruct
    return str(getattr(impl, "name", impl))


def _keys_to_data(tree: Any) -> tuple[Any, dict[str, str]]:
    """Replace typed key leaves by key_data; returns (tree, {keystr(path): impl name})."""
    impls: dict[str, str] = {}

    def f(path: Any, x: Any) -> Any:
        if _is_typed_key(x):
            impls[jax.tree_util.keystr(path)] = _impl_name(x)
            return jax.random.key_data(x)
        return x

    return jax.tree_util.tree_map_with_path(f, tree), impls


def _abstract_key_data(x: Any) -> jax.ShapeDtypeStruct:
    """ShapeDtypeStruct of key_data(x) for an abstract (or concrete) typed key array x."""
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        # the trailing key-data dimension is never sharded
        spec = tuple(sharding.spec) + (None,) * (len(data.shape) - len(sharding.spec))
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _data_to_keys(tree: Any, impls: Mapping[str, str]) -> Any:
    def f(path: Any, x: Any) -> Any:
        impl = impls.get(jax.tree_util.keystr(path))
        return jax.random.wrap_key_data(x, impl=impl) if impl is not None else x

    return jax.tree_util.tree_map_with_path(f, tree)


def _to_abstract(x: Any) -> Any:
    """A restore target for one leaf: ShapeDtypeStruct with a sharding (default: first local device)."""
    if _is_typed_key(x):
        x = _abstract_key_data(x)
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if isinstance(x, (np.ndarray, np.generic, int, float, bool)):
        arr = np.asarray(x)
        return jax.ShapeDtypeStruct(arr.shape, arr.dtype,
                                    sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return x


# ------------------------------------------------------------------------------------------------
# Checkpointer
# ------------------------------------------------------------------------------------------------
class Checkpointer:
    """Save / list / restore the checkpoints of one training stage.

    state: any pytree of arrays (params, optax state, typed RNG keys, scalar arrays).
    extra: a JSON-able dict saved next to it (data cursor, counters, anything the loop needs on resume).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: must keep at least one checkpoint")
        directory = storage.as_path(directory, "checkpoint directory")
        # orbax takes local folders and gs:// URLs (etils.epath + tensorstore) alike
        self.directory = directory if storage.is_remote(directory) else directory.absolute()
        self.keep = keep
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # remove saves killed mid-write
            enable_async_checkpointing=async_save,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _META))

    # -- listing ------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps, ascending (saves in flight or killed mid-write are not listed)."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._mngr.latest_step()

    # -- saving -------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *,
             cursor: DataCursor | None = None) -> bool:
        """Save `state` (pytree) and `extra` (JSON dict; `cursor` goes in as extra["cursor"]) as `step`.

        Returns False (and writes nothing) when `step` is already committed. Asynchronous: see the module
        docstring.
        """
        if step in self._mngr.all_steps():
            log.info("checkpoint %d already exists in %s; not overwritten", step, self.directory)
            return False
        tree, impls = _keys_to_data(state)
        meta = {"step": int(step), "extra": dict(extra or {}), "typed_keys": impls}
        if cursor is not None:
            meta["extra"]["cursor"] = cursor.to_dict()
        ok = self._mngr.save(
            int(step),
            args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(tree), _META: ocp.args.JsonSave(meta)}),
            force=True,
        )
        return bool(ok)

    def wait(self) -> None:
        """Block until every pending save is committed."""
        self._mngr.wait_until_finished()

    # -- restoring ----------------------------------------------------------------------------------
    def restore(self, step: int | None = None, target_abstract: Any = None) -> tuple[Any, dict[str, Any]]:
        """Restore (state, extra) of `step` (default: the latest committed step).

        target_abstract: a pytree with the structure of the saved state whose leaves are
          jax.ShapeDtypeStruct (with `sharding`) or arrays; each array is restored straight into that
          sharding and dtype, and containers (optax NamedTuples) come back as in the target. Without it,
          arrays come back as saved (single-device) in plain dict/list containers.
        Raises CheckpointError when there is no checkpoint or the structure does not match.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no committed checkpoint in {self.directory}")
        elif step not in self._mngr.all_steps():
            raise CheckpointError(f"no committed checkpoint for step {step} in {self.directory} "
                                  f"(available: {self.all_steps()})")
        meta = self._mngr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
        impls = meta.get("typed_keys", {})
        if target_abstract is not None:
            abstract = jax.tree.map(_to_abstract, target_abstract)
            args = ocp.args.StandardRestore(abstract)
        else:
            args = ocp.args.StandardRestore()
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(**{_STATE: args}))[_STATE]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {step} in {self.directory} does not match the target "
                                  f"structure: {e}") from e
        return _data_to_keys(restored, impls), dict(meta.get("extra", {}))

    def restore_extra(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON `extra` of a step (cheap: no arrays are read)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        meta = self._mngr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
        return dict(meta.get("extra", {}))

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStruct pytree (shapes, dtypes, shardings) of a concrete pytree: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                        if isinstance(x, jax.Array) else x, tree)
