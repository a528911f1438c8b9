"""Attention strategies of the decoder block, behind one signature.

    attend(q [B, T, H, D], k [B, T, K, D], v [B, T, K, D], kv) -> (o [B, T, H, D], kv)

q and k come rotated (RoPE) and unscaled; `kv` is the layer's cache state (None for the strategies without a
cache) and comes back updated. Heads are grouped: query head h reads kv head h // G (G = H / K).

Strategies:
- `causal(mask, kernel)`: training and cache-less forward passes. Token t attends to the real tokens
  (mask [B, T]) at slots <= t.
- `grouped_prompt(prompt_mask, completion_mask, kernel)`: a GRPO group as one sequence of P + G*C tokens,
  its prompt then its G completions; completion g attends to the prompt and its own earlier tokens only
  (`rwml_jax.rl.shared_prompt`).
  Both run on one of three kernels (`ExecutionConfig.attention`, chosen by `rwml_jax.platform`):
  "xla": the core here, on [B, K, G, T, D] with an additive float32 bias and a hand-written VJP that saves
  the probabilities (one [B, K, G, T, S] array instead of the autodiff version's several passes and layout
  copies), the CPU path; "cudnn" (GPU flash attention) and "splash" (the TPU Pallas kernel): the library
  kernels of `rwml_jax.models.attention_kernels`, same masks.
- `cached(allowed, index)`: the sampler's prefill and decode steps. kv = (k [B, K, D, S], v [B, K, S, D]):
  this call's keys and values are written into slots [index, index + T) in place (`dynamic_update_slice`
  on a donated or loop-carried buffer), then the queries attend to the slots `allowed` [B, T, S] permits.
  Keys are stored transposed and both caches heads-major, so a one-token step's two products are plain
  batched matmuls over the cache as it lies in memory: q [G, D] x k [D, S] and p [G, S] x v [S, D] per
  (row, kv head).
- `cached(allowed, index, prefix_mask)`: one-token decode steps of rows that continue shared prompts
  (GRPO groups of n rows per prompt). kv = (k, v, prefix_k [Bp, K, D, P], prefix_v [Bp, K, P, D]) with
  B = Bp * n and prefix_mask [Bp, P]; the cache holds only the rows' own tokens. One softmax runs over the
  prefix and the own slots, and the n rows of a prefix are folded into its query axis, so each prefix is
  read once per group instead of once per row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwml_jax.models import attention_kernels
from rwml_jax.platform import ATTENTION_KERNELS

NEG_INF = -1e30
KERNELS = ATTENTION_KERNELS[1:]  # "xla" | "cudnn" | "splash" (ATTENTION_KERNELS[0] is "auto")

Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


# ---------------------------------------------------------------------------------------------------
# The bias-attention core with a hand-written VJP (training and cache-less forward passes)
# ---------------------------------------------------------------------------------------------------

def _probs(q: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) + bias[:, None, None]
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


@jax.custom_vjp
def bias_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """softmax(q k^T + bias) v per (batch, kv head, query group).

    q: [B, K, G, T, D] (already scaled by D^-0.5), k, v: [B, K, S, D], bias: [B, T, S] float32 (0 where
    allowed, NEG_INF where masked). Returns [B, K, G, T, D] in q's dtype; softmax in float32.
    """
    return jnp.einsum("bkgts,bksd->bkgtd", _probs(q, k, bias).astype(v.dtype), v)


def _bias_attention_fwd(q, k, v, bias):
    p = _probs(q, k, bias)
    return jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v), (q, k, v, p)


def _bias_attention_bwd(res, dout):
    q, k, v, p = res
    pc = p.astype(v.dtype)
    dv = jnp.einsum("bkgts,bkgtd->bksd", pc, dout)
    dp = jnp.einsum("bkgtd,bksd->bkgts", dout, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))).astype(q.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", ds, k), jnp.einsum("bkgts,bkgtd->bksd", ds, q), dv, None


bias_attention.defvjp(_bias_attention_fwd, _bias_attention_bwd)


def _tril(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n), bool))


def _bias(allowed: jax.Array) -> jax.Array:
    return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)


def _attend_bias(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Each row's T queries over that row's S keys as `bias` [B, T, S] allows (S may differ from T);
    q [B, T, H, D] unscaled, k, v [B, S, K, D] -> o [B, T, H, D]."""
    B, T, H, D = q.shape
    K = k.shape[2]
    q = q * jnp.asarray(D**-0.5, q.dtype)
    qg = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    o = bias_attention(qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias)  # [B, K, G, T, D]
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, pattern: attention_kernels.Pattern, kernel: str) -> jax.Array:
    """q [B, T, H, D] unscaled, k, v [B, S, K, D] over `pattern` by `kernel` (module docstring)."""
    if kernel == "xla":
        return _attend_bias(q, k, v, _bias(pattern.allowed()))
    if kernel == "cudnn":
        return attention_kernels.dot_product(q, k, v, pattern, "cudnn")
    if kernel == "splash":
        return attention_kernels.splash(q, k, v, pattern)
    raise ValueError(f"attention kernel {kernel!r}; expected one of {KERNELS}")


def causal(mask: jax.Array, kernel: str = "xla") -> Attend:
    """Causal attention over a right- or left-padded batch (mask [B, T]); no cache (kv passes through)."""
    pattern = attention_kernels.Pattern(_tril(mask.shape[1]), mask, mask)
    if kernel == "xla":  # the bias once for every layer
        bias = _bias(pattern.allowed())
        return lambda q, k, v, kv: (_attend_bias(q, k, v, bias), kv)
    return lambda q, k, v, kv: (_attend(q, k, v, pattern, kernel), kv)


def grouped_prompt(prompt_mask: jax.Array, completion_mask: jax.Array, kernel: str = "xla") -> Attend:
    """Attention over bp groups of [P + G*C] tokens (prompt, then G completions of C slots);
    prompt_mask [bp, P], completion_mask [bp, G, C]."""
    bp, P = prompt_mask.shape
    G, C = completion_mask.shape[1:]
    c_mask = completion_mask.reshape(bp * G, C)
    prompt = attention_kernels.Pattern(_tril(P), prompt_mask, prompt_mask)
    own = attention_kernels.Pattern(np.concatenate([np.ones((C, P), bool), _tril(C)], axis=1), c_mask,
                                    jnp.concatenate([jnp.repeat(prompt_mask, G, axis=0), c_mask], axis=1))
    if kernel == "xla":  # the biases once for every layer
        bias_p, bias_c = _bias(prompt.allowed()), _bias(own.allowed())
        attend_p = lambda q, k, v: _attend_bias(q, k, v, bias_p)  # noqa: E731
        attend_c = lambda q, k, v: _attend_bias(q, k, v, bias_c)  # noqa: E731
    else:
        attend_p = lambda q, k, v: _attend(q, k, v, prompt, kernel)  # noqa: E731
        attend_c = lambda q, k, v: _attend(q, k, v, own, kernel)  # noqa: E731

    def rows(x, prompt):  # [bp, G*C, n, D] -> [bp*G, C, n, D], after the prompt's [bp, P, n, D] if given
        own = x.reshape(bp * G, C, *x.shape[2:])
        return own if prompt is None else jnp.concatenate([jnp.repeat(prompt, G, axis=0), own], axis=1)

    def attend(q, k, v, kv):
        op = attend_p(q[:, :P], k[:, :P], v[:, :P])  # prompt tokens, once per group
        oc = attend_c(rows(q[:, P:], None), rows(k[:, P:], k[:, :P]), rows(v[:, P:], v[:, :P]))
        return jnp.concatenate([op, oc.reshape(bp, G * C, *oc.shape[2:])], axis=1), kv

    return attend


# ---------------------------------------------------------------------------------------------------
# Cached attention (sampler prefill and decode steps)
# ---------------------------------------------------------------------------------------------------

def write_cache(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write k, v [B, T, K, D] into one layer's cache (keys [B, K, D, S], values [B, K, S, D]) at slots
    [index, index + T), each by one `dynamic_update_slice` on the cache array itself."""
    zero = jnp.zeros((), jnp.int32)
    k_new = jnp.transpose(k, (0, 2, 3, 1)).astype(k_cache.dtype)  # [B, K, D, T]
    v_new = jnp.swapaxes(v, 1, 2).astype(v_cache.dtype)  # [B, K, T, D]
    return (jax.lax.dynamic_update_slice(k_cache, k_new, (zero, zero, zero, index)),
            jax.lax.dynamic_update_slice(v_cache, v_new, (zero, zero, index, zero)))


def _fold(x: jax.Array, n: int) -> jax.Array:
    """[Bp * n, K, G, X] -> [Bp, K, n * G, X]: the n rows of a prefix folded into its query axis."""
    B, K, G, X = x.shape
    return x.reshape(B // n, n, K, G, X).transpose(0, 2, 1, 3, 4).reshape(B // n, K, n * G, X)


def _unfold(x: jax.Array, n: int) -> jax.Array:
    """Inverse of `_fold`: [Bp, K, n * G, X] -> [Bp * n, K, G, X]."""
    Bp, K, nG, X = x.shape
    return x.reshape(Bp, K, n, nG // n, X).transpose(0, 2, 1, 3, 4).reshape(Bp * n, K, nG // n, X)


def cached(allowed: jax.Array, index: jax.Array, prefix_mask: jax.Array | None = None) -> Attend:
    """Attention over a KV cache (module docstring). allowed: [B, T, S] bool; index: [] int32, the first
    slot this call writes; prefix_mask: [Bp, P] bool for shared prompts (one-token steps only)."""
    batch_dims = ((0, 1), (0, 1))

    def attend(q, k, v, kv):
        B, T, H, D = q.shape
        K = k.shape[2]
        cdt = q.dtype
        k_cache, v_cache = write_cache(kv[0], kv[1], k, v, index)
        keys, values = k_cache.astype(cdt), v_cache.astype(cdt)  # [B, K, D, S], [B, K, S, D]
        qg = q.reshape(B, T, K, H // K, D)
        if T == 1:  # a decode step: per (row, kv head) [G, D] x [D, S] and [G, S] x [S, D]
            scores = jax.lax.dot_general(qg[:, 0], keys, (((3,), (2,)), batch_dims),
                                         preferred_element_type=jnp.float32)
            scores = jnp.where(allowed[:, None], scores * (D**-0.5), NEG_INF)  # [B, K, G, S]
            if prefix_mask is None:
                probs = jax.nn.softmax(scores, axis=-1).astype(cdt)
                out = jax.lax.dot_general(probs, values, (((3,), (2,)), batch_dims))  # [B, K, G, D]
            else:
                out = _with_prefix(qg[:, 0], scores, values, kv[2], kv[3], prefix_mask)
        else:
            if prefix_mask is not None:
                raise ValueError("a shared prefix is for one-token decode steps")
            scores = jnp.einsum("btkgd,bkds->bkgts", qg, keys, preferred_element_type=jnp.float32)
            scores = jnp.where(allowed[:, None, None, :, :], scores * (D**-0.5), NEG_INF)
            probs = jax.nn.softmax(scores, axis=-1).astype(cdt)
            out = jnp.einsum("bkgts,bksd->btkgd", probs, values)
        return out.reshape(B, T, H, D), (k_cache, v_cache, *kv[2:])

    return attend


def _with_prefix(q: jax.Array, scores: jax.Array, values: jax.Array, k_p: jax.Array, v_p: jax.Array,
                 mask_p: jax.Array) -> jax.Array:
    """One decode step over a shared prefix and the rows' own slots, one softmax over both.

    q: [B, K, G, D]; scores: [B, K, G, S] over the own slots (masked, scaled, float32); values [B, K, S, D];
    k_p [Bp, K, D, P], v_p [Bp, K, P, D], mask_p [Bp, P] with B = Bp * n. Returns [B, K, G, D] in q's dtype.
    """
    B, K, G, D = q.shape
    Bp, P = mask_p.shape
    n = B // Bp
    batch_dims = ((0, 1), (0, 1))
    s_p = jax.lax.dot_general(_fold(q, n), k_p.astype(q.dtype), (((3,), (2,)), batch_dims),
                              preferred_element_type=jnp.float32)
    s_p = jnp.where(mask_p[:, None, None, :], s_p * (D**-0.5), NEG_INF)  # [Bp, K, n * G, P]
    probs = jax.nn.softmax(jnp.concatenate([_unfold(s_p, n), scores], axis=-1), axis=-1).astype(q.dtype)
    out = jax.lax.dot_general(probs[..., P:], values, (((3,), (2,)), batch_dims))  # [B, K, G, D]
    out_p = jax.lax.dot_general(_fold(probs[..., :P], n), v_p.astype(q.dtype), (((3,), (2,)), batch_dims))
    return out + _unfold(out_p, n)
