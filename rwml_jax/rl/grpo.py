"""GRPO as pure functions: group-relative advantages and the clipped policy loss with a KL penalty.

Shapes: N = number of sampled completions (prompts x group size, ordered group by group), B batch rows,
C completion length. Every per-token array is [B, C], aligned with the completion tokens; `mask` marks
the real (non-padding) completion tokens.

The loss is written as `numerator / denominator` (the tunix `algo_core` style): `policy_loss_terms`
returns the numerator of one (micro-)batch together with metric sums, and `loss_denominator` is a
function of the masks alone. A large batch split into micro-batches therefore gives exactly the
whole-batch loss and gradient when every micro-batch divides by the denominator of the whole batch
(see `rwml_jax.rl.update`).

Loss aggregation (`loss_agg`), with l[b, t] the per-token loss and m[b, t] the mask:
  "token-mean":          sum_bt l*m / sum_bt m                       (DAPO; every token weighs the same)
  "seq-mean-token-mean": (1/B) sum_b (sum_t l*m / max(sum_t m, 1))    (original GRPO)
  "seq-mean-token-sum":  (1/B) sum_b sum_t l*m                        (Dr. GRPO without the constant)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwml_jax.rl.grpo_options import KL_ESTIMATORS, LOSS_AGGS

Metrics = dict[str, jax.Array]


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
    ddof: int = 1,
) -> jax.Array:
    """Group-relative advantages A = (r - mean_group) / (std_group + eps).

    rewards: [N] float, ordered group by group (rows [g * group_size, (g + 1) * group_size) are the
      samples of prompt g). normalize_std=False gives the Dr. GRPO form A = r - mean_group.
    ddof: delta degrees of freedom of the group std; 1 (unbiased, the default) matches TRL and verl.
    Returns advantages [N] float32.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards.shape}")
    n = rewards.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards cannot be split into groups of group_size={group_size}")
    grouped = rewards.reshape(n // group_size, group_size)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    if normalize_std:
        if group_size - ddof < 1:
            raise ValueError(f"group_size={group_size} is too small for a std with ddof={ddof}")
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (group_size - ddof))
        centred = centred / (std + eps)
    return centred.reshape(n)


def advantages(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
    ddof: int = 1,
) -> np.ndarray:
    """`group_advantages` for groups named by id: row i's advantage is taken within the rows sharing
    `group_ids[i]`, wherever they sit (groups may interleave and differ in size).

    rewards, group_ids: [N] (group ids of any integer or string type). Returns advantages [N] float32 on
    the host. Rows that are already laid out group by group in groups of one size give exactly
    `group_advantages(rewards, size)`: each set of equally sized groups is gathered group by group and
    passed through it. Raises ValueError when a group is too small for its std (normalize_std and fewer
    than ddof + 1 rows), naming the group.
    """
    r = np.asarray(rewards)
    g = np.asarray(group_ids)
    if r.ndim != 1 or g.shape != r.shape:
        raise ValueError(f"rewards {r.shape} and group_ids {g.shape} must be 1-D of the same length")
    if r.size == 0:
        raise ValueError("no rewards")
    names, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # row indices, group by group
    size_of_row = counts[inverse]
    out = np.empty(r.shape, np.float32)
    for size in np.unique(counts):
        if normalize_std and size - ddof < 1:
            small = names[counts == size][:5].tolist()
            raise ValueError(f"groups {small} have {size} row(s); a group std with ddof={ddof} needs at least "
                             f"{ddof + 1} (drop them or use normalize_std=False)")
        rows = order[size_of_row[order] == size]
        out[rows] = np.asarray(group_advantages(r[rows], int(size), normalize_std=normalize_std, eps=eps, ddof=ddof))
    return out


def _check_options(loss_agg: str, kl_estimator: str) -> None:
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg={loss_agg!r}; expected one of {LOSS_AGGS}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled by the policy.

    k1: log(pi/pi_ref); k3 (Schulman's low-variance, non-negative estimator):
    pi_ref/pi - log(pi_ref/pi) - 1. Computed in float32.
    """
    d = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
    if estimator == "k1":
        return -d
    if estimator == "k3":
        return jnp.exp(d) - d - 1.0
    raise ValueError(f"kl_estimator={estimator!r}; expected one of {KL_ESTIMATORS}")


def aggregate_numerator(per_token: jax.Array, mask: jax.Array, loss_agg: str) -> jax.Array:
    """The numerator of the `loss_agg` aggregation of a [B, C] per-token quantity (a scalar)."""
    m = mask.astype(jnp.float32)
    if loss_agg == "seq-mean-token-mean":
        return jnp.sum(jnp.sum(per_token * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0))
    if loss_agg in ("token-mean", "seq-mean-token-sum"):
        return jnp.sum(per_token * m)
    raise ValueError(f"loss_agg={loss_agg!r}; expected one of {LOSS_AGGS}")


def loss_denominator(mask: jax.Array, loss_agg: str) -> jax.Array:
    """The denominator of the `loss_agg` aggregation over a whole batch: tokens or sequences (float32)."""
    if loss_agg == "token-mean":
        return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    if loss_agg in ("seq-mean-token-mean", "seq-mean-token-sum"):  # rows with a token (not padding rows)
        return jnp.maximum(jnp.sum(jnp.any(mask > 0, axis=-1).astype(jnp.float32)), 1.0)
    raise ValueError(f"loss_agg={loss_agg!r}; expected one of {LOSS_AGGS}")


def policy_loss_terms(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token-mean",
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Numerator of the GRPO loss and additive metric sums for one (micro-)batch.

    Returns (numerator, sums): the loss is numerator / loss_denominator(mask_of_whole_batch);
    `sums` holds masked token sums ("tokens", "clipped", "sampler_kl", ...), the "pg" and "kl"
    numerators, and maxima under keys starting with "max_"; `finalize_metrics` turns them into means.
    """
    _check_options(loss_agg, kl_estimator)
    f32 = jnp.float32
    logp = logp.astype(f32)
    old_logp = jax.lax.stop_gradient(old_logp.astype(f32))
    adv = jax.lax.stop_gradient(advantages.astype(f32))[:, None]
    m = mask.astype(f32)

    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg = jnp.maximum(pg_unclipped, pg_clipped)
    per_token = pg
    if kl_coef != 0.0:
        if ref_logp is None:
            raise ValueError("kl_coef != 0 needs ref_logp (log-probs of the frozen reference policy)")
        kl = kl_penalty(logp, jax.lax.stop_gradient(ref_logp), kl_estimator)
        per_token = per_token + kl_coef * kl
    elif ref_logp is not None:
        kl = kl_penalty(logp, jax.lax.stop_gradient(ref_logp), kl_estimator)
    else:
        kl = None

    sg = jax.lax.stop_gradient
    is_clipped = (pg_clipped > pg_unclipped).astype(f32)
    low = (ratio < 1.0 - clip_eps_low) & (adv < 0)
    high = (ratio > 1.0 + clip_eps_high) & (adv > 0)
    # KL(pi_old || pi_theta) from tokens sampled by pi_old: k1 = -log r, k3 = r - 1 - log r.
    sums: dict[str, jax.Array] = {
        "tokens": jnp.sum(m),
        "clipped": jnp.sum(sg(is_clipped) * m),
        "clipped_low": jnp.sum(low.astype(f32) * m),
        "clipped_high": jnp.sum(high.astype(f32) * m),
        "sampler_kl": jnp.sum(sg(ratio - 1.0 - log_ratio) * m),
        "sampler_kl_k1": jnp.sum(sg(-log_ratio) * m),
        "ratio": jnp.sum(sg(ratio) * m),
        "max_ratio": jnp.max(jnp.where(m > 0, sg(ratio), 0.0), initial=0.0),
        "pg": sg(aggregate_numerator(pg, m, loss_agg)),
    }
    if kl is not None:
        sums["ref_kl"] = jnp.sum(sg(kl) * m)
        sums["kl"] = sg(aggregate_numerator(kl, m, loss_agg))
    if entropy is not None:
        sums["entropy"] = jnp.sum(sg(entropy.astype(f32)) * m)
    return aggregate_numerator(per_token, m, loss_agg), sums


def finalize_metrics(sums: dict[str, jax.Array], denominator: jax.Array) -> Metrics:
    """Metric sums (over all micro-batches) -> means: token means for token metrics, the loss
    aggregation for "pg_loss" / "kl_loss"."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    out: Metrics = {"tokens": sums["tokens"]}
    names = {"clipped": "clip_frac", "clipped_low": "clip_frac_low", "clipped_high": "clip_frac_high",
             "sampler_kl": "sampler_kl", "sampler_kl_k1": "sampler_kl_k1", "ratio": "ratio_mean",
             "ref_kl": "ref_kl", "entropy": "entropy", "nll": "nll"}
    for key, value in sums.items():
        if key in names:
            out[names[key]] = value / tokens
        elif key == "pg":
            out["pg_loss"] = value / denominator
        elif key == "kl":
            out["kl_loss"] = value / denominator
        elif key.startswith("max_"):
            out[key] = value
    return out


def policy_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, advantages: jax.Array,
                mask: jax.Array, **options: Any) -> tuple[jax.Array, Metrics]:
    """The GRPO objective (to minimise) for one batch; options as `policy_loss_terms` (clip_eps_low,
    clip_eps_high, kl_coef, kl_estimator, loss_agg, entropy).

    logp, old_logp, ref_logp, mask: [B, C] log-probs of the sampled completion tokens under the policy
      being trained, the sampling policy and the frozen reference; mask 1 on real tokens.
      ref_logp may be None when kl_coef == 0.
    advantages: [B] (e.g. from `group_advantages`).
    Per token: max(-A r, -A clip(r, 1 - clip_eps_low, 1 + clip_eps_high)) + kl_coef * KL_est, with
    r = exp(logp - old_logp) and KL_est the `kl_estimator` ("k1" or "k3") of KL(pi_theta || pi_ref);
    aggregated by `loss_agg` (module docstring). entropy: optional [B, C] per-token policy entropy,
    reported as a metric.
    Returns (loss float32 scalar, metrics): clip_frac (the clipped branch is active), clip_frac_low /
    clip_frac_high (ratio below / above the trust region where it matters), sampler_kl (k3 estimate of
    KL(pi_old || pi_theta)), sampler_kl_k1, ratio_mean, max_ratio, pg_loss, and with a reference
    ref_kl (token mean of the estimator) and kl_loss (its `loss_agg` aggregation); entropy if given.
    """
    num, sums = policy_loss_terms(logp, old_logp, ref_logp, advantages, mask, **options)
    den = loss_denominator(mask, options.get("loss_agg", "token-mean"))
    return num / den, finalize_metrics(sums, den)
