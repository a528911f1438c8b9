"""The mixture-of-experts MLP of Qwen3-MoE: router, top-k, dropless grouped matmul, expert parallelism.

    y, stats = moe_mlp(config, (router, gate, up, down), h, token_mask)

The sparse layers of `rwml_jax.models.block.block` call this instead of the dense SwiGLU. Semantics are
`transformers`' `Qwen3MoeSparseMoeBlock`: router logits h @ router, softmax over the X experts in float32,
the k largest probabilities (renormalised to sum to one when `norm_topk_prob`), and
y = sum over the chosen experts e of p_e * down_e(silu(gate_e h) * up_e h).

Dropless: the N * k (token, expert) assignments are sorted by expert and every expert multiplies its own
contiguous rows with one grouped matmul (`jax.lax.ragged_dot`, group sizes = tokens per expert); no
capacity factor, no dropped tokens, and the FLOPs are those of the k active experts per token.

Expert parallelism: expert weights carry the logical axes ("experts", "expert_embed", "expert_mlp") and
tokens ("activation_batch", ...). Under a mesh whose expert / fsdp / tensor axes are > 1 the expert
computation runs in `jax.shard_map`: each device gathers its expert group's tokens (all-gather over
"expert"; the same result as an all-to-all dispatch, each device keeping only the assignments routed to
its own experts), gathers its experts' fsdp-sharded weights, multiplies its local experts' rows, and the
partial outputs are summed back to the token owners (psum over "tensor", psum_scatter over "expert").
Routing itself (router matmul, softmax, top-k) is ordinary sharded code.

Shapes: N tokens (B * T), E hidden, X experts (Xl = X / expert-axis size on one device), k experts per
token, F = moe_intermediate_size.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rwml_jax.models.config import ModelConfig

# Logical axes of the expert weights (`rwml_jax.models.decoder`, `rwml_jax.sharding.DEFAULT_RULES`).
GATE_UP_AXES = ("experts", "expert_embed", "expert_mlp")  # [X, E, F]
DOWN_AXES = ("experts", "expert_mlp", "expert_embed")  # [X, F, E]
ROUTER_AXES = ("embed", None)  # [E, X]


def route(c: ModelConfig, h: jax.Array, router: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h [N, E] -> (probs [N, X] float32 (softmax of the router logits), top_w [N, k] float32 (the chosen
    experts' weights, renormalised when `norm_topk_prob`), top_i [N, k] int32 (the chosen experts))."""
    logits = jnp.matmul(h, router.astype(h.dtype), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_w, top_i = jax.lax.top_k(probs, c.num_experts_per_tok)
    if c.norm_topk_prob:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return probs, top_w, top_i.astype(jnp.int32)


def experts_local(h: jax.Array, top_i: jax.Array, top_w: jax.Array, gate: jax.Array, up: jax.Array,
                  down: jax.Array, first: Any = 0) -> jax.Array:
    """The contribution of experts [first, first + Xl) (the weights given: gate, up [Xl, E, F], down
    [Xl, F, E]) to the tokens h [N, E] routed by top_i, top_w [N, k]. Returns y [N, E] in h's dtype.

    The N * k assignments are sorted by expert (assignments to other experts last) and each expert's rows
    go through one grouped matmul; rows of other experts contribute zero."""
    N, k = top_i.shape
    Xl = gate.shape[0]
    e = top_i.reshape(-1) - first  # [N * k]
    local = (e >= 0) & (e < Xl)
    key = jnp.where(local, e, Xl)
    order = jnp.argsort(key, stable=True)
    token = order // k
    sizes = jnp.bincount(key, length=Xl + 1)[:Xl].astype(jnp.int32)  # rows per local expert
    xs = jnp.take(h, token, axis=0)  # [N * k, E], grouped by expert
    cdt = h.dtype
    g = jax.lax.ragged_dot(xs, gate.astype(cdt), sizes)
    u = jax.lax.ragged_dot(xs, up.astype(cdt), sizes)
    o = jax.lax.ragged_dot(jax.nn.silu(g) * u, down.astype(cdt), sizes)  # [N * k, E]
    w = jnp.take(top_w.reshape(-1), order).astype(cdt)
    o = jnp.where(jnp.take(local, order)[:, None], o * w[:, None], 0)
    return jnp.zeros_like(h).at[token].add(o)


def _mesh_axes(logical: tuple[str | None, ...]) -> tuple[Any, ...]:
    """Mesh axes of logical axis names under the active rules (`rwml_jax.sharding.tracing_context`)."""
    return tuple(nn.logical_to_mesh_axes(logical))


def _names(spec_entry: Any) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def experts(h: jax.Array, top_i: jax.Array, top_w: jax.Array, gate: jax.Array, up: jax.Array,
            down: jax.Array) -> jax.Array:
    """Every expert's contribution y [N, E] (module docstring): on one device (or without a mesh) one
    `experts_local`; under a mesh that shards the experts, their weights or the tokens, a `shard_map`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or all(n == 1 for n in mesh.shape.values()):
        return experts_local(h, top_i, top_w, gate, up, down)
    ex, emb, mlp = (_names(a) for a in _mesh_axes(GATE_UP_AXES))
    batch = _names(_mesh_axes(("activation_batch",))[0])
    size = {a: mesh.shape[a] for a in mesh.axis_names}
    shards = 1
    for a in batch:
        shards *= size[a]
    if h.shape[0] % shards:  # e.g. one decode row on many devices: every device sees every token
        batch = ()
    ex_size = 1
    for a in ex:
        ex_size *= size[a]
    Xl = gate.shape[0] // ex_size
    tok_spec = P(batch or None, None)
    gu_spec, d_spec = P(ex or None, emb or None, mlp or None), P(ex or None, mlp or None, emb or None)
    gather_tokens = tuple(a for a in batch if a in ex)  # the expert group's tokens

    def body(h, top_i, top_w, gate, up, down):
        if emb:  # ZeRO-3: the local experts' full weights
            gate = jax.lax.all_gather(gate, emb, axis=1, tiled=True)
            up = jax.lax.all_gather(up, emb, axis=1, tiled=True)
            down = jax.lax.all_gather(down, emb, axis=2, tiled=True)
        if gather_tokens:
            h, top_i, top_w = (jax.lax.all_gather(a, gather_tokens, axis=0, tiled=True) for a in (h, top_i, top_w))
        first = jax.lax.axis_index(ex) * Xl if ex else 0
        y = experts_local(h, top_i, top_w, gate, up, down, first)
        if mlp:  # each device summed over its slice of F
            y = jax.lax.psum(y, mlp)
        rest = tuple(a for a in ex if a not in gather_tokens)  # expert axes the tokens are replicated over
        if rest:
            y = jax.lax.psum(y, rest)
        if gather_tokens:
            y = jax.lax.psum_scatter(y, gather_tokens, scatter_dimension=0, tiled=True)
        return y

    return jax.shard_map(body, mesh=mesh, in_specs=(tok_spec, tok_spec, tok_spec, gu_spec, gu_spec, d_spec),
                         out_specs=tok_spec, check_vma=False)(h, top_i, top_w, gate, up, down)


def moe_mlp(c: ModelConfig, weights: tuple[jax.Array, ...], h: jax.Array,
            token_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sparse MLP on h [N, E] (compute dtype). weights: (router [E, X], gate [X, E, F], up [X, E, F],
    down [X, F, E]); token_mask: [N], which tokens count in the router statistics (default: all).

    Returns (y [N, E], stats): stats holds float32 sums over the counted tokens for
    `load_balancing_loss` and logging: counts [X] (assignments per expert), probs [X] (router
    probabilities per expert), tokens [] (tokens counted)."""
    router, gate, up, down = weights
    probs, top_w, top_i = route(c, h, router)
    y = experts(h, top_i, top_w.astype(h.dtype), gate, up, down)
    m = jnp.ones(h.shape[:1], jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
    stats = {"counts": jnp.zeros((c.num_experts,), jnp.float32).at[top_i].add(jnp.broadcast_to(m[:, None], top_i.shape)),
             "probs": jnp.sum(probs * m[:, None], axis=0), "tokens": jnp.sum(m)}
    return y, stats


def load_balancing_loss(c: ModelConfig, stats: dict[str, jax.Array]) -> jax.Array:
    """The Switch-Transformer auxiliary loss of `transformers` (`load_balancing_loss_func`) from the router
    statistics summed over the sparse layers: X * sum_x (counts_x / rows) (probs_x / rows), rows = the
    counted tokens times the number of sparse layers. Gradients flow through `probs` only."""
    rows = jnp.maximum(stats["tokens"], 1.0)
    counts = jax.lax.stop_gradient(stats["counts"])
    return c.num_experts * jnp.sum((counts / rows) * (stats["probs"] / rows))
