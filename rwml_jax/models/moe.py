"""The mixture-of-experts MLP of Qwen3-MoE: router, top-k, dropless grouped matmul, expert parallelism.

    y, stats = moe_mlp(config, (router, gate, up, down), h, token_mask)

The sparse layers of `rwml_jax.models.block.block` call this instead of the dense SwiGLU. Semantics are
`transformers`' `Qwen3MoeSparseMoeBlock`: router logits h @ router, softmax over the X experts in float32,
the k largest probabilities (renormalised to sum to one when `norm_topk_prob`), and
y = sum over the chosen experts e of p_e * down_e(silu(gate_e h) * up_e h).

Dropless: the N * k (token, expert) assignments are sorted by expert and every expert multiplies its own
contiguous rows with one grouped matmul; no capacity factor, no dropped tokens, and the FLOPs are those of
the k active experts per token. Two forms of the grouped matmul (`grouped_swiglu`):
- "ragged" (TPU, GPU): `jax.lax.ragged_dot` with group sizes = rows per expert (XLA's ragged-dot
  instruction on TPU; on GPU its lowering, or the Pallas Triton kernel under
  `jax_ragged_dot_use_gpu_pallas_triton_lowering`);
- "blocked" (CPU, where `ragged_dot` is lowered to a dense product with every expert, X times the work):
  each expert's rows padded to whole blocks of `block_rows` rows, then one batched matmul over the blocks
  with each block's expert weights gathered (the MegaBlocks layout); at most X blocks are padding.

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


def block_rows(rows: int, groups: int) -> int:
    """Rows per block of the blocked grouped matmul: the mean rows per group rounded down to a power of two
    in [8, 256]. Then there are at most 2 x groups blocks while the rows fill fewer than 256 blocks (the
    gathered block weights stay within twice the experts' own) and the padding, under one block per group,
    at most doubles the work."""
    b = 8
    while b < 256 and 2 * b * groups <= rows:
        b *= 2
    return b


@jax.custom_vjp
def gather_rows(x: jax.Array, idx: jax.Array, inv: jax.Array) -> jax.Array:
    """x_ext[idx] with x_ext = x [R, ...] and a zero row appended (idx == R selects it). idx [S] must reach
    each row at most once and inv [R] be its inverse (inv[idx[s]] = s; S where no slot takes the row): the
    backward is then the gather ct_ext[inv], not a scatter-add (slow on the CPU)."""
    return jnp.concatenate([x, jnp.zeros_like(x[:1])]).take(idx, axis=0)


def _gather_rows_fwd(x, idx, inv):
    return gather_rows(x, idx, inv), (idx, inv)


def _gather_rows_bwd(res, ct):
    idx, inv = res
    return gather_rows(ct, inv, idx), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def grouped_swiglu(xs: jax.Array, sizes: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
                   impl: str = "auto") -> jax.Array:
    """Each group's SwiGLU: rows xs [R, E] sorted by group, sizes [G] rows per group (rows past their sum
    belong to no group and give zeros), gate / up [G, E, F], down [G, F, E] in xs's dtype. Returns [R, E].
    impl: "ragged", "blocked" (module docstring) or "auto" (blocked on the CPU, ragged elsewhere)."""
    if impl == "auto":
        impl = "blocked" if jax.default_backend() == "cpu" else "ragged"
    if impl == "ragged":
        g = jax.lax.ragged_dot(xs, gate, sizes)
        u = jax.lax.ragged_dot(xs, up, sizes)
        return jax.lax.ragged_dot(jax.nn.silu(g) * u, down, sizes)
    R, E = xs.shape
    G = sizes.shape[0]
    b = block_rows(R, G)
    n_blocks = -(-R // b) + G  # every group's rows rounded up to whole blocks fit
    S = n_blocks * b
    blocks = (sizes + b - 1) // b
    blk_end = jnp.cumsum(blocks)
    ends = jnp.cumsum(sizes)
    row = jnp.arange(R)
    grp = jnp.searchsorted(ends, row, side="right")  # the row's group; G past the groups
    g_ = jnp.minimum(grp, G - 1)
    pos = jnp.where(grp < G, (blk_end[g_] - blocks[g_]) * b + row - (ends[g_] - sizes[g_]), S)  # row -> slot
    src = jnp.full((S + 1,), R, jnp.int32).at[pos].set(row.astype(jnp.int32))[:S]  # slot -> row (R: padding)
    xp = gather_rows(xs, src, pos).reshape(n_blocks, b, E)
    blk_grp = jnp.minimum(jnp.searchsorted(blk_end, jnp.arange(n_blocks), side="right"), G - 1)
    g = jnp.einsum("nbe,nef->nbf", xp, jnp.take(gate, blk_grp, axis=0))
    u = jnp.einsum("nbe,nef->nbf", xp, jnp.take(up, blk_grp, axis=0))
    y = jnp.einsum("nbf,nfe->nbe", jax.nn.silu(g) * u, jnp.take(down, blk_grp, axis=0)).reshape(S, E)
    return gather_rows(y, pos, src)


def experts_local(h: jax.Array, top_i: jax.Array, top_w: jax.Array, gate: jax.Array, up: jax.Array,
                  down: jax.Array, first: Any = 0, impl: str = "auto") -> jax.Array:
    """The contribution of experts [first, first + Xl) (the weights given: gate, up [Xl, E, F], down
    [Xl, F, E]) to the tokens h [N, E] routed by top_i, top_w [N, k]. Returns y [N, E] in h's dtype.

    The N * k assignments are sorted by expert (assignments to other experts last) and each expert's rows
    go through one grouped matmul (`grouped_swiglu`, impl); rows of other experts contribute zero. Rows
    move by gathers with the inverse permutation as their gradient (`gather_rows`)."""
    N, k = top_i.shape
    Xl = gate.shape[0]
    e = top_i.reshape(-1) - first  # [N * k]
    local = (e >= 0) & (e < Xl)
    key = jnp.where(local, e, Xl)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # sorted slot -> assignment
    inv = jnp.zeros_like(order).at[order].set(jnp.arange(N * k, dtype=jnp.int32))  # assignment -> sorted slot
    sizes = jnp.bincount(key, length=Xl + 1)[:Xl].astype(jnp.int32)  # rows per local expert
    cdt = h.dtype
    xs = gather_rows(jnp.repeat(h, k, axis=0), order, inv)  # [N * k, E], grouped by expert
    o = grouped_swiglu(xs, sizes, gate.astype(cdt), up.astype(cdt), down.astype(cdt), impl)  # [N * k, E]
    o = gather_rows(o, inv, order).reshape(N, k, -1)  # back in assignment order
    w = jnp.where(local, top_w.reshape(-1), 0).astype(cdt).reshape(N, k, 1)
    return jnp.sum(jnp.where(local.reshape(N, k, 1), o * w, 0), axis=1)


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
    size = {a: mesh.shape[a] for a in mesh.axis_names}
    ex, emb, mlp = (tuple(n for n in _names(a) if n in size) for a in _mesh_axes(GATE_UP_AXES))
    batch = tuple(n for n in _names(_mesh_axes(("activation_batch",))[0]) if n in size)
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
