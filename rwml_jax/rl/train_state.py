"""Train state (params, optimizer state, step) and the AdamW optimizer with warm-up and schedule.

The state is a pytree; `state_shardings` gives its NamedShardings on a mesh (optimizer moments are
sharded like the parameters they belong to), and `create_train_state` builds it directly in those
shardings, so nothing is ever replicated on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SCHEDULES = ("constant", "cosine", "linear")


@flax.struct.dataclass
class TrainState:
    """step: [] int32, number of applied optimizer updates; params: model pytree; opt_state: optax state."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up, then a constant / cosine / linear schedule, and global-norm clipping.

    learning_rate: peak rate. warmup_steps: the rate rises linearly to the peak over these updates
    (update k, counting from 0, uses peak * (k + 1) / warmup_steps). total_steps: length of the decay
    for "cosine" / "linear" (required for them), ending at peak * end_lr_ratio. weight_decay applies to
    matrices only (kernels, embeddings), not to norms and biases. max_grad_norm: clip the global
    gradient norm (0 or None disables). state_dtype: dtype of Adam's first moment (optax's ``mu_dtype``);
    the second moment keeps the parameters' dtype.
    """

    learning_rate: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"
    total_steps: int | None = None
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    state_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.schedule != "constant" and not self.total_steps:
            raise ValueError(f"schedule={self.schedule!r} needs total_steps")
        if self.warmup_steps < 0 or self.learning_rate < 0:
            raise ValueError("warmup_steps and learning_rate must be >= 0")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Update count -> learning rate (see OptimizerConfig)."""
    peak, warm = cfg.learning_rate, cfg.warmup_steps
    end = peak * cfg.end_lr_ratio

    def schedule(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count, jnp.float32)
        warmup = peak * jnp.minimum(1.0, (count + 1.0) / max(warm, 1))
        if cfg.schedule == "constant":
            return warmup
        decay_len = max(cfg.total_steps - warm, 1)
        frac = jnp.clip((count - warm) / decay_len, 0.0, 1.0)
        if cfg.schedule == "cosine":
            after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        else:
            after = peak + (end - peak) * frac
        return jnp.where(count < warm, warmup, after)

    return schedule


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """optax chain: clip_by_global_norm -> AdamW(schedule), weight decay on matrices only."""
    parts = []
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=_matrix_mask, mu_dtype=jnp.dtype(cfg.state_dtype),
        )
    )
    return optax.chain(*parts)


def _matrix_mask(params: Any) -> Any:
    """Weight-decay mask: True for kernels and embeddings, False for norm scales and biases."""
    def is_matrix(path: tuple[Any, ...], _leaf: Any) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return name.endswith("kernel") or name in ("embed", "lm_head")

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def state_shardings(optimizer: optax.GradientTransformation, param_shardings: Any, mesh: Mesh) -> TrainState:
    """NamedShardings of a TrainState: moments follow their parameter, counters are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1,), jnp.float32), param_shardings)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_sh = optax.tree_map_params(
        optimizer,
        lambda _leaf, sh: sh,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _leaf: replicated,
    )
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_sh)


def create_train_state(
    params: Any, optimizer: optax.GradientTransformation, shardings: TrainState | None = None
) -> TrainState:
    """A fresh TrainState around `params` (optimizer moments created in place, sharded like
    `shardings` when given). `params` is not donated: the caller may keep it (e.g. as the reference)."""
    def build(p: Any) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p))

    if shardings is None:
        return jax.jit(build)(params)
    return jax.jit(build, in_shardings=(shardings.params,), out_shardings=shardings)(params)
