"""Per-token log-probabilities of completion tokens, computed in float32 without [B, T, V] logits.

The decoder runs once over the whole packed sequence [B, T] and returns final-norm hidden states;
only the C positions that predict completion tokens go through the LM head ([B, C, V] instead of
[B, T, V]). With `chunk` set, the LM head and log-softmax run over `chunk` completion positions at a
time under `jax.checkpoint`, so at most [B, chunk, V] logits are alive in the forward and the
backward pass (useful for 150k-token vocabularies on accelerators; on CPU the unchunked form is
usually faster).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rwml_jax import platform
from rwml_jax.models import decoder
from rwml_jax.models.block import ParamWeights
from rwml_jax.models.config import ModelConfig
from rwml_jax.rl import shared_prompt


def completion_positions(completion_start: jax.Array, completion_len: int, seq_len: int) -> jax.Array:
    """[B, C] int32: the slot of completion token j of each row (clipped into [0, T))."""
    idx = completion_start[:, None].astype(jnp.int32) + jnp.arange(completion_len, dtype=jnp.int32)[None, :]
    return jnp.clip(idx, 0, seq_len - 1)


def _logits_lse(h: jax.Array, w: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    logits = jnp.matmul(h, w, preferred_element_type=jnp.float32)  # [N, V] float32
    if temperature != 1.0:
        logits = logits / temperature
    return logits, jax.nn.logsumexp(logits, axis=-1)


def _pick(logits: jax.Array, targets: jax.Array, gather: bool) -> jax.Array:
    if gather:
        return jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    # compare-and-reduce: partitions over a vocabulary sharded across devices (a gather would not)
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.sum(jnp.where(vocab == targets[:, None], logits, 0.0), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def token_logprobs(h: jax.Array, w: jax.Array, targets: jax.Array, with_entropy: bool, gather: bool,
                   ordered: bool = False, temperature: float = 1.0):
    """log softmax(h w / temperature)[target] and the entropy of that softmax, row by row, in float32.

    h: [N, E], w: [E, V] (compute dtype), targets: [N] int32. Returns (logp [N], entropy [N]; zeros
    unless with_entropy). The entropy carries no gradient. The hand-written VJP turns the saved
    float32 logits into d logits = g (onehot - softmax) in one pass and feeds it to the two
    matmuls, instead of the several [N, V] passes of the autodiff version. gather: pick the target
    logit with a gather (False: compare-and-reduce, for a vocabulary sharded over devices). ordered: the
    backward computes dh before dw, each on every thread (`platform.ExecutionConfig.ordered_head_grad`).
    temperature: the policy is softmax(logits / temperature), the distribution a rollout at that
    temperature samples from (1 = the model's own).
    """
    return _token_logprobs_fwd(h, w, targets, with_entropy, gather, ordered, temperature)[0]


def _token_logprobs_fwd(h, w, targets, with_entropy, gather, ordered, temperature):
    logits, lse = _logits_lse(h, w, temperature)
    logp = _pick(logits, targets, gather) - lse
    if with_entropy:
        ent = lse - jnp.sum(jnp.exp(logits - lse[:, None]) * logits, axis=-1)
    else:
        ent = jnp.zeros_like(lse)
    return (logp, ent), (h, w, targets, logits, lse)


def _token_logprobs_bwd(with_entropy, gather, ordered, temperature, res, cotangents):
    h, w, targets, logits, lse = res  # logits already divided by the temperature
    g, _ = cotangents  # the entropy is a metric: no gradient
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    onehot = (vocab == targets[:, None]).astype(jnp.float32)
    dlogits = ((g / temperature)[:, None] * (onehot - jnp.exp(logits - lse[:, None]))).astype(h.dtype)
    dh = jax.lax.dot_general(dlogits, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if ordered:  # dw after dh, in w's [E, V] orientation (see `rwml_jax.platform`)
        dh, dlogits = jax.lax.optimization_barrier((dh, dlogits))
    dw = jax.lax.dot_general(h, dlogits, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    if ordered:
        dw = jax.lax.optimization_barrier(dw)
    return dh.astype(h.dtype), dw.astype(w.dtype), None


token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def _logp_and_entropy(
    config: ModelConfig, params: Any, hidden: jax.Array, targets: jax.Array, with_entropy: bool,
    gather: bool, ordered: bool, temperature: float,
) -> tuple[jax.Array, jax.Array | None]:
    """hidden [B, c, E], targets [B, c] -> (log p(target) [B, c] f32, entropy [B, c] f32 or None)."""
    B, c, E = hidden.shape
    h = hidden.reshape(B * c, E).astype(jnp.dtype(config.compute_dtype))
    logp, ent = token_logprobs(h, ParamWeights(config).head(params), targets.reshape(B * c).astype(jnp.int32),
                               with_entropy, gather, ordered, temperature)
    return logp.reshape(B, c), (jax.lax.stop_gradient(ent).reshape(B, c) if with_entropy else None)


def logprobs_from_hidden(
    config: ModelConfig,
    params: Any,
    hidden: jax.Array,
    targets: jax.Array,
    *,
    chunk: int | None = None,
    with_entropy: bool = False,
    gather: bool = True,
    execution: platform.ExecutionConfig | None = None,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array | None]:
    """Log-probs of `targets` [B, C] given the hidden states that predict them, hidden [B, C, E].

    chunk: completion positions per LM-head chunk (must divide C); None or 0 = all at once.
    gather: pick target logits with a gather (False when the vocabulary is sharded over devices).
    execution: the LM head's gradient order (default `platform.default_execution`).
    temperature: log-probs and entropy of softmax(logits / temperature) (see `token_logprobs`).
    Returns (logp [B, C] float32, entropy [B, C] float32 (no gradient) or None).
    """
    B, C, E = hidden.shape
    ordered = (execution or platform.default_execution(config)).ordered_head_grad
    if not chunk or chunk >= C:
        return _logp_and_entropy(config, params, hidden, targets, with_entropy, gather, ordered, temperature)
    if C % chunk:
        raise ValueError(f"logits chunk {chunk} does not divide the completion length {C}")
    n = C // chunk
    hs = jnp.moveaxis(hidden.reshape(B, n, chunk, E), 1, 0)  # [n, B, chunk, E]; batch sharding kept
    ts = jnp.moveaxis(targets.reshape(B, n, chunk), 1, 0)

    @jax.checkpoint
    def one(h_t):
        h, t = h_t
        logp, ent = _logp_and_entropy(config, params, h, t, with_entropy, gather, ordered, temperature)
        return logp, (ent if ent is not None else jnp.zeros_like(logp))

    logp, ent = jax.lax.map(one, (hs, ts))
    logp = jnp.moveaxis(logp, 0, 1).reshape(B, C)
    ent = jnp.moveaxis(ent, 0, 1).reshape(B, C) if with_entropy else None
    return logp, ent


def completion_logprobs(
    config: ModelConfig,
    params: Any,
    batch: dict[str, jax.Array],
    *,
    chunk: int | None = None,
    with_entropy: bool = False,
    fuse: bool = True,
    gather: bool = True,
    execution: platform.ExecutionConfig | None = None,
    with_router: bool = False,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array | None]:
    """Log-probs of each row's completion tokens under (config, params), of softmax(logits / temperature).

    batch: the row layout (`rwml_jax.rl.batch`): `input_ids` [B, T], `attention_mask` [B, T],
    `completion_start` [B], `completion_mask` [B, C]; or the grouped layout of GRPO groups sharing their
    prompt (`rwml_jax.rl.shared_prompt`: `prompt_ids` ..., B = bp * G rows out, group by group).
    fuse: fused q/k/v and gate/up matmuls; gather: gather the target
    logits (use False for both when the mesh's tensor axis is > 1); execution: layer loop, remat and
    head-gradient order (default `platform.default_execution`).
    Returns (logp [B, C] float32, zero where the mask is 0; entropy [B, C] or None), and with `with_router`
    the router statistics of the batch's real tokens (`rwml_jax.models.moe.moe_mlp`; None for a dense model).
    Differentiable with respect to `params`.
    """
    if "prompt_ids" in batch:
        h, targets, mask, stats = shared_prompt.completion_hidden(config, params, batch, fuse=fuse,
                                                                  execution=execution, with_router=True)
    else:
        ids, mask = batch["input_ids"], batch["completion_mask"]
        hidden, _, stats = decoder.apply(config, params, ids, batch["attention_mask"], return_hidden=True,
                                         weights=ParamWeights(config, fuse), execution=execution, with_router=True)
        pos = completion_positions(batch["completion_start"], mask.shape[1], ids.shape[1])  # [B, C] target slots
        targets = jnp.take_along_axis(ids, pos, axis=1)
        # The hidden state at slot s - 1 predicts the token at slot s.
        h = jnp.take_along_axis(hidden, jnp.maximum(pos - 1, 0)[..., None], axis=1)  # [B, C, E]
    logp, ent = logprobs_from_hidden(config, params, h, targets, chunk=chunk, with_entropy=with_entropy,
                                     gather=gather, execution=execution, temperature=temperature)
    logp, ent = masked(logp, ent, mask)
    return (logp, ent, stats) if with_router else (logp, ent)


def masked(logp: jax.Array, ent: jax.Array | None, completion_mask: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """logp and entropy [B, C] set to 0 where completion_mask [B, C] is 0."""
    m = completion_mask > 0
    return jnp.where(m, logp, 0.0), (None if ent is None else jnp.where(m, ent, 0.0))
