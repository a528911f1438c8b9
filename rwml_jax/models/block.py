"""The decoder block: one pre-norm transformer layer (Qwen2 / Qwen3 / Llama 3 / Qwen3-MoE), the only one there is.

    x, kv, stats = block(config, weights, layer_params, x, cos, sin, attend, kv, token_mask)

The full forward, the training forward and the sampler's prefill and decode steps all run this function;
they differ in two arguments:
- `attend` (`rwml_jax.models.attention`): causal training attention, grouped-prompt training attention,
  or cached attention (prefill / decode, with or without a shared prefix);
- `weights`: the weight format, an object that knows how one layer's parameters are laid out and how
  to multiply by them. `ParamWeights` (here) reads the parameter tree of `rwml_jax.models.decoder`
  (the layout the optimiser updates and checkpoints hold); the sampler brings its own decode formats
  (`rwml_jax.sampling.weight_format`). A format provides:
      norm(lp, name) -> scale                      name: input_norm | post_attention_norm | q_norm | k_norm
      qkv(lp, h [N, E]) -> q [N, H*D], k [N, K*D], v [N, K*D]   (biases added)
      out(lp, o [N, H*D]) -> [N, E]
      gate_up(lp, h [N, E]) -> gate [N, F], up [N, F]
      down(lp, a [N, F]) -> [N, E]
      lm_logits(params, hidden [..., E]) -> float32 logits [..., V]
      sparse(lp) -> bool                           whether the layer's MLP is the mixture of experts
      moe(lp) -> (router [E, X], gate [X, E, Fm], up [X, E, Fm], down [X, Fm, E])   (sparse layers)

The MLP is the dense SwiGLU or, in the sparse layers of a mixture-of-experts model (Qwen3-MoE), the
router and experts of `rwml_jax.models.moe`; a sparse layer also returns its router statistics.

The residual stream is 2-D, x [N, E] with N = B * T tokens in row-major order: with one sequence per
micro-batch (GRPO groups sharing their prompt) XLA:CPU ran the norms and their backward on [1, T, E]
several times slower than on [T, E] (RMSNorm forward + backward 2.4 against 0.4 ms for T = 1,152, E = 256).

Shapes: B batch, T tokens, E hidden, H query heads, K kv heads, D head_dim, F SwiGLU width, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwml_jax.models import moe
from rwml_jax.models.attention import Attend
from rwml_jax.models.config import ModelConfig
from rwml_jax.models.rope import apply_rope

Params = Any


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, accumulated in float32, returned in `x.dtype`."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * x32).astype(x.dtype)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """A logical sharding constraint (active under `rwml_jax.sharding.tracing_context`)."""
    return nn.with_logical_constraint(x, axes)


class ParamWeights:
    """The weight format of the model's parameter tree (`rwml_jax.models.decoder`, "Parameters").

    fuse: one matmul for q/k/v and one for gate/up, on weights concatenated per call (use it when the
    mesh's tensor axis is 1: concatenating head-sharded weights would need communication).
    """

    def __init__(self, config: ModelConfig, fuse: bool = True):
        self.config, self.fuse = config, fuse
        self.cdt = jnp.dtype(config.compute_dtype)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamWeights) and (self.config, self.fuse) == (other.config, other.fuse)

    def __hash__(self) -> int:
        return hash((ParamWeights, self.config, self.fuse))

    def norm(self, lp: Params, name: str) -> jax.Array:
        return (lp["attn"] if name in ("q_norm", "k_norm") else lp)[name]["scale"]

    def _matmul(self, x: jax.Array, ws: list[jax.Array]) -> list[jax.Array]:
        ws = [w.astype(self.cdt) for w in ws]
        if self.fuse and len(ws) > 1:
            return split_widths(x @ jnp.concatenate(ws, axis=1), [w.shape[1] for w in ws])
        return [x @ w for w in ws]

    def _bias(self, ys: list[jax.Array], biases: list[jax.Array | None]) -> list[jax.Array]:
        return [y if b is None else y + b.reshape(-1).astype(self.cdt) for y, b in zip(ys, biases)]

    def qkv(self, lp: Params, h: jax.Array) -> list[jax.Array]:
        a, E = lp["attn"], self.config.hidden_size
        ys = self._matmul(h, [a[f"{n}_kernel"].reshape(E, -1) for n in "qkv"])
        return self._bias(ys, [a.get(f"{n}_bias") for n in "qkv"])

    def out(self, lp: Params, o: jax.Array) -> jax.Array:
        a = lp["attn"]
        y = o @ a["o_kernel"].reshape(-1, self.config.hidden_size).astype(self.cdt)
        return self._bias([y], [a.get("o_bias")])[0]

    def gate_up(self, lp: Params, h: jax.Array) -> list[jax.Array]:
        m = lp["mlp"]
        return self._bias(self._matmul(h, [m["gate_kernel"], m["up_kernel"]]), [m.get("gate_bias"), m.get("up_bias")])

    def down(self, lp: Params, a: jax.Array) -> jax.Array:
        m = lp["mlp"]
        return self._bias([a @ m["down_kernel"].astype(self.cdt)], [m.get("down_bias")])[0]

    def sparse(self, lp: Params) -> bool:
        return "moe" in lp

    def moe(self, lp: Params) -> tuple[jax.Array, ...]:
        m = lp["moe"]
        return m["router"], m["gate_kernel"], m["up_kernel"], m["down_kernel"]

    def head(self, params: Params) -> jax.Array:
        """The output projection [E, V] in the compute dtype (the transposed embedding when tied)."""
        w = params["embed"].T if self.config.tie_word_embeddings else params["lm_head"]
        return w.astype(self.cdt)

    def lm_logits(self, params: Params, hidden: jax.Array) -> jax.Array:
        return jnp.matmul(hidden.astype(self.cdt), self.head(params), preferred_element_type=jnp.float32)


def split_widths(y: jax.Array, widths: list[int]) -> list[jax.Array]:
    """Split the last axis of y into consecutive pieces of `widths`."""
    cuts, total = [], 0
    for w in widths[:-1]:
        total += w
        cuts.append(total)
    return jnp.split(y, cuts, axis=-1)


def block(c: ModelConfig, weights: Any, lp: Params, x: jax.Array, cos: jax.Array, sin: jax.Array,
          attend: Attend, kv: Any = None, token_mask: jax.Array | None = None) -> tuple[jax.Array, Any, Any]:
    """One pre-norm block on the residual stream x [B * T, E] (compute dtype).

    weights: the weight format of `lp` (one layer's parameters); cos, sin: RoPE tables [B, T, D];
    attend: the attention strategy; kv: this layer's cache state for it (None without a cache);
    token_mask: [B * T], the tokens counted in a sparse layer's router statistics (default all).
    Returns (x [B * T, E], kv updated by `attend`, the router statistics of `moe.moe_mlp` for a sparse
    layer, None for a dense one).
    """
    B, T = cos.shape[:2]
    N, E = x.shape
    H, K, D, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size

    h = rms_norm(x, weights.norm(lp, "input_norm"), c.rms_norm_eps)
    q, k, v = weights.qkv(lp, h)
    if c.qk_norm:
        q = rms_norm(q.reshape(N, H, D), weights.norm(lp, "q_norm"), c.rms_norm_eps)
        k = rms_norm(k.reshape(N, K, D), weights.norm(lp, "k_norm"), c.rms_norm_eps)
    q = apply_rope(q.reshape(B, T, H, D), cos, sin)
    k = apply_rope(k.reshape(B, T, K, D), cos, sin)
    o, kv = attend(q, k, v.reshape(B, T, K, D), kv)
    x = x + weights.out(lp, o.reshape(N, H * D))

    h = rms_norm(x, weights.norm(lp, "post_attention_norm"), c.rms_norm_eps)
    stats = None
    if weights.sparse(lp):
        y, stats = moe.moe_mlp(c, weights.moe(lp), h, token_mask)
    else:
        gate, up = weights.gate_up(lp, h)
        act = constrain((jax.nn.silu(gate) * up).reshape(B, T, F),
                        ("activation_batch", "activation_length", "activation_mlp")).reshape(N, F)
        y = weights.down(lp, act)
    x = constrain((x + y).reshape(B, T, E), ("activation_batch", "activation_length", "activation_embed"))
    return x.reshape(N, E), kv, stats
