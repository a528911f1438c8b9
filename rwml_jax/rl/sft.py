"""Token-level supervised fine-tuning on completion tokens only (next-state SFT, imitation learning).

Same machinery as the GRPO step (`rwml_jax.rl.update.UpdateStep`): packed batches from
`rwml_jax.rl.batch`, float32 log-softmax, micro-batch gradient accumulation normalised by the whole
batch, global-norm clipping, AdamW, donated state, NaN/Inf guard. Prompt tokens never contribute.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rwml_jax.models.config import ModelConfig
from rwml_jax.rl import grpo
from rwml_jax.rl.update import BASE_KEYS, Loss, UpdateStep

SFT_LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """loss_agg: how token losses are averaged (see `rwml_jax.rl.grpo`; "token-mean" is the usual
    cross-entropy). micro_batch_size / logits_chunk / with_entropy / router_aux_loss_coef: as in `GRPOConfig`."""

    loss_agg: str = "token-mean"
    micro_batch_size: int | None = None
    logits_chunk: int | None = None
    with_entropy: bool = False
    router_aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_agg not in SFT_LOSS_AGGS:
            raise ValueError(f"loss_agg={self.loss_agg!r}; expected one of {SFT_LOSS_AGGS}")


def sft_loss_terms(
    logp: jax.Array, mask: jax.Array, *, loss_agg: str = "token-mean", entropy: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Numerator of the cross-entropy -log p(completion token) aggregated by `loss_agg`, and metric sums.

    logp, mask: [B, C]. Divide by `grpo.loss_denominator(mask_of_whole_batch, loss_agg)`.
    """
    m = mask.astype(jnp.float32)
    nll = -logp.astype(jnp.float32)
    sums = {"tokens": jnp.sum(m), "nll": jax.lax.stop_gradient(jnp.sum(nll * m))}
    if entropy is not None:
        sums["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy) * m)
    return grpo.aggregate_numerator(nll, m, loss_agg), sums


def sft_loss(logp: jax.Array, mask: jax.Array, *, loss_agg: str = "token-mean") -> jax.Array:
    """Cross-entropy on the masked completion tokens of one batch (float32 scalar)."""
    num, _ = sft_loss_terms(logp, mask, loss_agg=loss_agg)
    return num / grpo.loss_denominator(mask, loss_agg)


def _finalize(sums: dict[str, jax.Array], den: jax.Array) -> dict[str, jax.Array]:
    tokens = jnp.maximum(sums["tokens"], 1.0)
    out = {"tokens": sums["tokens"], "nll": sums["nll"] / tokens}
    out["perplexity"] = jnp.exp(out["nll"])
    if "entropy" in sums:
        out["entropy"] = sums["entropy"] / tokens
    return out


def make_sft_step(model_config: ModelConfig, sft_config: SFTConfig, optimizer: optax.GradientTransformation,
                  mesh: Mesh, **step_options: Any) -> UpdateStep:
    """The SFT update: `state, metrics = step(state, batch)`; batch from `rwml_jax.rl.batch.pack`.
    step_options: `UpdateStep`'s (rules, learning_rate, check_finite, execution).

    Metrics: loss, nll (token mean, = loss for "token-mean"), perplexity, grad_norm, tokens, seqs,
    step, finite, learning_rate (when given), entropy (when enabled); router_aux_loss and the expert
    metrics (`rwml_jax.rl.update.expert_metrics`) for a mixture-of-experts model.
    """
    def terms(logp, entropy, mb, _ref):
        return sft_loss_terms(logp, mb["completion_mask"], loss_agg=sft_config.loss_agg, entropy=entropy)

    loss = Loss(
        terms=terms,
        denominator=lambda b: grpo.loss_denominator(b["completion_mask"], sft_config.loss_agg),
        finalize=_finalize,
        required_keys=BASE_KEYS,
        micro_batch_size=sft_config.micro_batch_size,
        logits_chunk=sft_config.logits_chunk,
        with_entropy=sft_config.with_entropy,
        router_aux_loss_coef=sft_config.router_aux_loss_coef,
    )
    return UpdateStep(model_config, optimizer, mesh, loss, **step_options)
