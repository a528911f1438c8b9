"""Device mesh, logical-axis rules and multi-host start-up.

Sharding is data, not code: parameters and activations carry logical axis names ("embed", "mlp",
"q_heads", "vocab", "layers", "activation_batch", ...), and a rules table maps each to mesh axes. The
mesh always has the four axes ("data", "fsdp", "expert", "tensor"); a size-1 axis costs nothing, so the
same rules serve one CPU, 8 forced CPU devices, a GPU and a TPU pod slice. The "expert" axis splits the
experts of a mixture-of-experts model (`rwml_jax.models.moe`) and, like data and fsdp, the batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated). Parameters shard their "embed" dimension
# over fsdp (ZeRO-3 style) and head / mlp / vocab dimensions over tensor; activations shard the batch
# over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("experts", "expert"),
    ("expert_embed", "fsdp"),
    ("expert_mlp", "tensor"),
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Call `jax.distributed.initialize` when asked to by arguments or the environment.

    Explicit arguments win; otherwise RWML_COORDINATOR / RWML_NUM_PROCESSES / RWML_PROCESS_ID are read.
    On TPU pods and SLURM/GPU clusters JAX auto-detects everything: set RWML_DISTRIBUTED=1 there.
    Returns True when JAX runs multi-process afterwards.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("RWML_COORDINATOR")
    if num_processes is None and "RWML_NUM_PROCESSES" in env:
        num_processes = int(env["RWML_NUM_PROCESSES"])
    if process_id is None and "RWML_PROCESS_ID" in env:
        process_id = int(env["RWML_PROCESS_ID"])
    auto = env.get("RWML_DISTRIBUTED") == "1"
    if coordinator_address is None and not auto:
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    kwargs: dict[str, Any] = {}
    if coordinator_address is not None:
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None, *,
              expert: int = 1) -> Mesh:
    """A ("data", "fsdp", "expert", "tensor") mesh over `devices` (all devices by default).

    One axis may be -1: it takes whatever the others leave. Raises ValueError naming the sizes when the
    product does not match the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, expert, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        if len(devices) % rest:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // rest
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x expert={sizes[2]} x tensor={sizes[3]} = "
            f"{int(np.prod(sizes))} devices, "
            f"but {len(devices)} are available"
        )
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU / odd topologies: plain order is fine
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def logical_to_sharding(logical: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """Map a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical, mesh, list(rules))


def named(mesh: Mesh, *axes: Any) -> NamedSharding:
    """Shorthand: NamedSharding(mesh, PartitionSpec(*axes))."""
    return NamedSharding(mesh, PartitionSpec(*axes))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over data x fsdp x expert, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def axis_rules(rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """Context manager that activates the rules for `nn.with_logical_constraint` inside traced code."""
    return nn.logical_axis_rules(list(rules))


# ---------------------------------------------------------------------------------------------------
# Config-driven mesh and rules
# ---------------------------------------------------------------------------------------------------

def mesh_from_config(cfg: Mapping[str, Any] | Any | None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from a config with `data`, `fsdp`, `expert`, `tensor` entries (mapping or attribute style).

    Missing entries default to data=-1 (all remaining devices), fsdp=1, expert=1, tensor=1; None gives that
    default.
    """
    def get(name: str, default: int) -> int:
        if cfg is None:
            return default
        value = cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)
        return default if value is None else int(value)

    unknown = set(cfg) - set(MESH_AXES) if isinstance(cfg, Mapping) else set()
    if unknown:
        raise ValueError(f"unknown mesh config keys {sorted(unknown)}; expected {MESH_AXES}")
    return make_mesh(get("data", -1), get("fsdp", 1), get("tensor", 1), devices=devices, expert=get("expert", 1))


def rules_from_config(
    overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
    base: Sequence[tuple[str, Any]] = DEFAULT_RULES,
) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with some logical axes remapped, e.g. {"vocab": None, "embed": ["fsdp", "tensor"]}.

    Values are a mesh axis name, a list of names, or None (replicated). Raises ValueError naming an
    unknown logical axis or mesh axis.
    """
    table = dict(base)
    items = overrides.items() if isinstance(overrides, Mapping) else (overrides or ())
    for logical, target in items:
        if logical not in table:
            raise ValueError(f"unknown logical axis {logical!r} in sharding rules; known: {sorted(table)}")
        names = [] if target is None else [target] if isinstance(target, str) else list(target)
        bad = [n for n in names if n not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule {logical!r} -> {target!r}: unknown mesh axes {bad}; mesh axes are {MESH_AXES}")
        table[logical] = None if not names else names[0] if len(names) == 1 else tuple(names)
    return tuple(table.items())


@contextlib.contextmanager
def tracing_context(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Iterator[None]:
    """Use inside a traced (jitted) function: activates the rules and `mesh` for the logical sharding
    constraints of the model (`nn.with_logical_constraint`)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
        yield


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over (data x fsdp x expert)."""
    return tuple(a for a in ("data", "fsdp", "expert") if a in mesh.shape)


def batch_size_multiple(mesh: Mesh) -> int:
    """Global batch sizes must be a multiple of this (the data x fsdp x expert device count)."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


# ---------------------------------------------------------------------------------------------------
# Creating arrays directly in their shardings
# ---------------------------------------------------------------------------------------------------

def shard_batch(batch: Any, mesh: Mesh, sharding: NamedSharding | None = None) -> Any:
    """Global host batch (a pytree of NumPy arrays, identical on every process) -> global jax.Arrays
    split over data x fsdp along axis 0. Each process transfers only the rows its devices hold."""
    sharding = sharding or NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))
    multiple = batch_size_multiple(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_callback((), NamedSharding(mesh, PartitionSpec()), lambda _: x)
        if x.shape[0] % multiple:
            raise ValueError(
                f"batch dimension {x.shape[0]} is not a multiple of data x fsdp = {multiple} devices"
            )
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, batch)


def shard_local_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Process-local rows (each process loaded its own part of the batch) -> global jax.Arrays whose
    axis 0 concatenates the processes' rows in process order."""
    sharding = NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def to_host(tree: Any) -> Any:
    """Fetch a pytree of (possibly multi-host sharded) arrays as full NumPy arrays on every process."""
    def get(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's picklable `obj`, in process order ([obj] with one process). A collective: every
    process must call it, in the same order."""
    if jax.process_count() == 1:
        return [obj]
    import pickle

    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [pickle.loads(every[i, : int(n)].tobytes()) for i, n in enumerate(sizes)]
