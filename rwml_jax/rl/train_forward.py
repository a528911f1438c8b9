"""The decoder's forward pass laid out for training: the same parameters and numbers as
`rwml_jax.models.decoder.apply(..., return_hidden=True)` (no KV cache), arranged so that the backward
pass XLA derives is cheap.

Differences from the sampler-oriented decoder (all numerically equivalent):
- projections are 2-D matmuls over flattened tokens [B*T, E]; with `fuse=True` q/k/v and gate/up run
  as one matmul each (weights concatenated per step; use it when the mesh's tensor axis is 1, since
  concatenating head-sharded weights would need communication);
- attention runs on [B, K, G, T, D] with an additive float32 mask bias and a hand-written VJP
  (`attention`), which saves the probabilities and skips the layout copies and extra softmax passes
  of the autodiff version;
- `config.remat` ("none" / "full" / "dots") rematerialises each layer as in the decoder;
- `config.layer_loop` picks a `lax.scan` over the stacked layers or the layers unrolled
  (`unrolls_layers`).

Shapes: B batch, T tokens, E hidden, H query heads, K kv heads, G = H / K, D head_dim, F SwiGLU width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwml_jax.models.config import ModelConfig
from rwml_jax.models.decoder import positions_from_mask, rms_norm
from rwml_jax.models.rope import apply_rope, rope_tables

_NEG_INF = -1e30
# "auto" unrolls the layer loop on CPU up to this many layers. The scan's backward stacks each layer's
# residuals into [L, ...] buffers (zero-filled, written and read back by dynamic slices); unrolled, those
# copies go and XLA:CPU fuses across layers: the `tiny` layer stack's gradient 166 against 197 ms, the
# shared-prompt GRPO update 2.83 against 2.94 s (interleaved, 10 steps each), for a longer compile.
_AUTO_UNROLL_MAX_LAYERS = 12


def unrolls_layers(config: ModelConfig) -> bool:
    """Whether the training forward inlines every layer (`config.layer_loop`) instead of scanning."""
    if config.layer_loop == "auto":
        return jax.default_backend() == "cpu" and config.num_hidden_layers <= _AUTO_UNROLL_MAX_LAYERS
    return config.layer_loop == "unroll"


# ---------------------------------------------------------------------------------------------------
# Attention core with a hand-written VJP
# ---------------------------------------------------------------------------------------------------

def _probs(q: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) + bias[:, None, None]
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """softmax(q k^T + bias) v per (batch, kv head, query group).

    q: [B, K, G, T, D] (already scaled by D^-0.5), k, v: [B, K, S, D], bias: [B, T, S] float32
    (0 where allowed, -1e30 where masked). Returns [B, K, G, T, D] in q's dtype; softmax in float32.
    """
    return jnp.einsum("bkgts,bksd->bkgtd", _probs(q, k, bias).astype(v.dtype), v)


def _attention_fwd(q, k, v, bias):
    p = _probs(q, k, bias)
    out = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v)
    return out, (q, k, v, p)


def _attention_bwd(res, dout):
    q, k, v, p = res
    pc = p.astype(v.dtype)
    dv = jnp.einsum("bkgts,bkgtd->bksd", pc, dout)
    dp = jnp.einsum("bkgtd,bksd->bkgts", dout, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksd->bkgtd", ds, k)
    dk = jnp.einsum("bkgts,bkgtd->bksd", ds, q)
    return dq, dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------

def _constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, axes)


# attend(q [B, T, H, D] (scaled, rotated), k [B, T, K, D] (rotated), v [B, T, K, D]) -> o [B, T, H, D]
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def causal_bias(mask: jax.Array) -> jax.Array:
    """[B, T, T] float32 additive bias: token t attends to the real tokens (mask [B, T]) at slots <= t."""
    slot = jnp.arange(mask.shape[1])
    allowed = (slot[None, :] <= slot[:, None])[None] & mask.astype(bool)[:, None, :]
    return jnp.where(allowed, 0.0, _NEG_INF).astype(jnp.float32)


def bias_attend(bias: jax.Array) -> Attend:
    """Attention of each row's T queries over that row's S keys, as `bias` [B, T, S] allows (S may
    differ from T: the keys are whatever `attend` is given)."""

    def attend(q, k, v):
        B, T, H, D = q.shape
        K = k.shape[2]
        qg = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
        o = attention(qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias)  # [B, K, G, T, D]
        return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)

    return attend


def _layer(c: ModelConfig, lp: dict[str, Any], x: jax.Array, cos: jax.Array, sin: jax.Array,
           attend: Attend, fuse: bool) -> jax.Array:
    """One pre-norm block on the residual stream x [B * T, E] (compute dtype); lp: this layer's slice of
    params["layers"]; cos, sin: RoPE tables [B, T, D]; attend: how tokens attend to each other
    (`bias_attend`).

    The stream stays 2-D between layers: with B == 1 (one shared-prompt group per micro-batch) XLA:CPU
    runs the norms' reductions and their backward on [1, T, E] several times slower than on [T, E]
    (RMSNorm forward + backward 2.4 against 0.4 ms for T = 1,152, E = 256).
    """
    B, T = cos.shape[:2]
    E = x.shape[-1]
    H, K, D, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    cdt = jnp.dtype(c.compute_dtype)
    a, m = lp["attn"], lp["mlp"]

    h = rms_norm(x, lp["input_norm"]["scale"], c.rms_norm_eps)
    wq, wk, wv = (a[f"{n}_kernel"].reshape(E, -1).astype(cdt) for n in "qkv")
    if fuse:
        qkv = h @ jnp.concatenate([wq, wk, wv], axis=1)
        q, k, v = jnp.split(qkv, [H * D, (H + K) * D], axis=1)
    else:
        q, k, v = h @ wq, h @ wk, h @ wv
    if c.qkv_bias:
        q = q + a["q_bias"].reshape(-1).astype(cdt)
        k = k + a["k_bias"].reshape(-1).astype(cdt)
        v = v + a["v_bias"].reshape(-1).astype(cdt)
    if c.qk_norm:
        q = rms_norm(q.reshape(B * T, H, D), a["q_norm"]["scale"], c.rms_norm_eps)
        k = rms_norm(k.reshape(B * T, K, D), a["k_norm"]["scale"], c.rms_norm_eps)
    q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, K, D), v.reshape(B, T, K, D)
    q = apply_rope(q, cos, sin) * jnp.asarray(D**-0.5, cdt)
    k = apply_rope(k, cos, sin)
    o = attend(q, k, v).reshape(B * T, H * D)
    y = o @ a["o_kernel"].reshape(H * D, E).astype(cdt)
    if c.o_bias:
        y = y + a["o_bias"].astype(cdt)
    x = x + y

    h = rms_norm(x, lp["post_attention_norm"]["scale"], c.rms_norm_eps)
    wg, wu = m["gate_kernel"].astype(cdt), m["up_kernel"].astype(cdt)
    if fuse:
        gate, up = jnp.split(h @ jnp.concatenate([wg, wu], axis=1), [F], axis=1)
    else:
        gate, up = h @ wg, h @ wu
    if c.mlp_bias:
        gate = gate + m["gate_bias"].astype(cdt)
        up = up + m["up_bias"].astype(cdt)
    act = _constrain((jax.nn.silu(gate) * up).reshape(B, T, F),
                     ("activation_batch", "activation_length", "activation_mlp")).reshape(B * T, F)
    y = act @ m["down_kernel"].astype(cdt)
    if c.mlp_bias:
        y = y + m["down_bias"].astype(cdt)
    x = _constrain((x + y).reshape(B, T, E), ("activation_batch", "activation_length", "activation_embed"))
    return x.reshape(B * T, E)


def hidden_states(
    config: ModelConfig,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    fuse: bool = True,
) -> jax.Array:
    """Final-norm hidden states [B, T, E] of a right- or left-padded batch (no cache).

    input_ids, attention_mask: [B, T]; positions skip padding (as `decoder.apply`). Equal to
    `decoder.apply(config, params, input_ids, attention_mask, return_hidden=True)[0]` up to float
    rounding. fuse: one matmul for q/k/v and one for gate/up (see module docstring).
    """
    c = config
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), bool)
    mask = attention_mask.astype(bool)
    cos, sin = rope_tables(c, positions_from_mask(mask))
    return run_layers(config, params, input_ids, cos, sin, bias_attend(causal_bias(mask)), fuse=fuse)


def run_layers(
    config: ModelConfig,
    params: Any,
    input_ids: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    attend: Attend,
    *,
    fuse: bool = True,
) -> jax.Array:
    """Embed input_ids [B, T], run every layer with the given RoPE tables [B, T, D] and attention
    pattern, and return the final-norm hidden states [B, T, E] (compute dtype)."""
    c = config
    B, T = input_ids.shape
    x = jnp.take(params["embed"], input_ids, axis=0).astype(jnp.dtype(c.compute_dtype))
    x = _constrain(x, ("activation_batch", "activation_length", "activation_embed")).reshape(B * T, -1)

    def body(x, lp):
        return _layer(c, lp, x, cos, sin, attend, fuse), None

    if c.remat != "none":
        policy = None if c.remat == "full" else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, params["layers"], unroll=unrolls_layers(c))
    return rms_norm(x, params["final_norm"]["scale"], c.rms_norm_eps).reshape(B, T, -1)
