"""GRPO advantages and policy loss (value, gradient, metrics) against a direct NumPy reference."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwml_jax.rl import grpo

jax.config.update("jax_enable_x64", False)


# ------------------------------------------------------------------------------------------------
# NumPy references, written from the definitions (DeepSeekMath GRPO, Schulman's KL estimators)
# ------------------------------------------------------------------------------------------------

def np_group_advantages(rewards, group_size, normalize_std=True, eps=1e-6, ddof=1):
    out = np.zeros(len(rewards), np.float64)
    for g in range(len(rewards) // group_size):
        r = np.asarray(rewards[g * group_size:(g + 1) * group_size], np.float64)
        a = r - r.mean()
        if normalize_std:
            a = a / (r.std(ddof=ddof) + eps)
        out[g * group_size:(g + 1) * group_size] = a
    return out


def np_policy_loss(logp, old, ref, adv, mask, eps_lo, eps_hi, kl_coef, est, agg):
    """Returns (loss, d loss / d logp, metrics) in float64, token by token."""
    B, C = logp.shape
    loss, grad = 0.0, np.zeros((B, C))
    n_tok = mask.sum()
    n_seq = max(int((mask.sum(-1) > 0).sum()), 1)  # sequences = rows with a completion token (padding rows are not)
    clipped = ref_kl_sum = sampler_kl_sum = 0.0
    for b in range(B):
        n_b = mask[b].sum()
        for t in range(C):
            if not mask[b, t]:
                continue
            r = np.exp(logp[b, t] - old[b, t])
            A = adv[b]
            unclipped = -A * r
            clipped_val = -A * min(max(r, 1 - eps_lo), 1 + eps_hi)
            if clipped_val > unclipped:
                pg, dpg = clipped_val, 0.0
                clipped += 1
            else:
                pg, dpg = unclipped, -A * r
            d = ref[b, t] - logp[b, t]
            if est == "k1":
                kl, dkl = -d, 1.0
            else:
                kl, dkl = np.exp(d) - d - 1, 1.0 - np.exp(d)
            ref_kl_sum += kl
            sampler_kl_sum += r - 1 - np.log(r)
            if agg == "token-mean":
                w = 1.0 / n_tok
            elif agg == "seq-mean-token-mean":
                w = 1.0 / (n_seq * max(n_b, 1))
            else:
                w = 1.0 / n_seq
            loss += w * (pg + kl_coef * kl)
            grad[b, t] = w * (dpg + kl_coef * dkl)
    metrics = dict(clip_frac=clipped / n_tok, ref_kl=ref_kl_sum / n_tok, sampler_kl=sampler_kl_sum / n_tok)
    return loss, grad, metrics


def random_inputs(seed, B=6, C=7, spread=0.4):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.95, (B, C)))
    old = logp + rng.normal(0, spread, (B, C))  # ratios well inside and outside [0.8, 1.2]
    ref = logp + rng.normal(0, spread, (B, C))
    adv = rng.normal(0, 1, B)
    adv[0] = 0.0
    lengths = rng.integers(1, C + 1, B)
    lengths[1] = 0  # an empty completion must not produce NaN
    mask = (np.arange(C)[None, :] < lengths[:, None]).astype(np.float64)
    return logp, old, ref, adv, mask


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_group_advantages_matches_numpy(normalize_std, group_size):
    rng = np.random.default_rng(group_size)
    rewards = rng.integers(0, 2, 4 * group_size).astype(np.float64)  # binary rewards, as in RWML
    rewards[:group_size] = 1.0  # a constant group: advantage 0, not NaN
    rewards[group_size:2 * group_size] = rng.normal(size=group_size)
    got = np.asarray(grpo.group_advantages(jnp.asarray(rewards), group_size, normalize_std=normalize_std))
    want = np_group_advantages(rewards, group_size, normalize_std=normalize_std)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[:group_size] == 0.0)
    # each group is centred; with std normalisation its unbiased std is 1 (up to eps)
    groups = got.reshape(-1, group_size)
    np.testing.assert_allclose(groups.mean(1), 0.0, atol=1e-5)
    if normalize_std:
        s = groups[1].std(ddof=1)
        np.testing.assert_allclose(s, 1.0, rtol=1e-4)


def test_group_advantages_population_std_and_errors():
    r = np.array([0.0, 1.0, 1.0, 1.0, 3.0, 2.0])
    got = np.asarray(grpo.group_advantages(r, 3, ddof=0, eps=0.0))
    np.testing.assert_allclose(got, np_group_advantages(r, 3, ddof=0, eps=0.0), rtol=1e-6)
    with pytest.raises(ValueError, match="group_size=4"):
        grpo.group_advantages(r, 4)
    with pytest.raises(ValueError, match="1-D"):
        grpo.group_advantages(r.reshape(2, 3), 3)


ALL_OPTIONS = list(itertools.product(grpo.LOSS_AGGS, grpo.KL_ESTIMATORS, [0.0, 0.1], [(0.2, 0.2), (0.1, 0.28)]))


@pytest.mark.parametrize("loss_agg,kl_estimator,kl_coef,eps", ALL_OPTIONS)
def test_policy_loss_value_and_gradient_match_numpy(loss_agg, kl_estimator, kl_coef, eps):
    eps_lo, eps_hi = eps
    logp, old, ref, adv, mask = random_inputs(seed=ALL_OPTIONS.index((loss_agg, kl_estimator, kl_coef, eps)))
    kw = dict(clip_eps_low=eps_lo, clip_eps_high=eps_hi, kl_coef=kl_coef, kl_estimator=kl_estimator, loss_agg=loss_agg)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

    def loss_of(lp, o, r):
        return grpo.policy_loss(lp, o, r, f32(adv), f32(mask), **kw)[0]

    loss, metrics = grpo.policy_loss(f32(logp), f32(old), f32(ref), f32(adv), f32(mask), **kw)
    g_logp, g_old, g_ref = jax.grad(loss_of, argnums=(0, 1, 2))(f32(logp), f32(old), f32(ref))
    want_loss, want_grad, want_m = np_policy_loss(logp, old, ref, adv, mask, eps_lo, eps_hi, kl_coef, kl_estimator, loss_agg)

    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_logp), want_grad, rtol=2e-5, atol=1e-7)
    # the sampler's and the reference's log-probs are constants of the objective
    assert not np.any(np.asarray(g_old)) and not np.any(np.asarray(g_ref))
    assert 0.0 < want_m["clip_frac"] < 1.0  # the inputs exercise both branches
    for name in ("clip_frac", "ref_kl", "sampler_kl"):
        np.testing.assert_allclose(float(metrics[name]), want_m[name], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["pg_loss"]) + kl_coef * float(metrics["kl_loss"]), float(loss), rtol=1e-5, atol=1e-7)


def test_policy_loss_is_plain_policy_gradient_on_policy():
    """old_logp == logp: ratio 1, nothing clipped, gradient = -A * weight per token."""
    logp, _, _, adv, mask = random_inputs(3)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    g = jax.grad(lambda lp: grpo.policy_loss(lp, jax.lax.stop_gradient(lp), None, f32(adv), f32(mask))[0])(f32(logp))
    want = -adv[:, None] * mask / mask.sum()
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-8)
    _, m = grpo.policy_loss(f32(logp), f32(logp), None, f32(adv), f32(mask))
    assert float(m["clip_frac"]) == 0.0 and float(m["sampler_kl"]) == 0.0 and "ref_kl" not in m


def test_entropy_metric_and_zero_kl_for_identical_reference():
    logp, old, _, adv, mask = random_inputs(5)
    ent = np.random.default_rng(0).uniform(0, 3, logp.shape)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    _, m = grpo.policy_loss(f32(logp), f32(old), f32(logp), f32(adv), f32(mask), kl_coef=0.5, entropy=f32(ent))
    np.testing.assert_allclose(float(m["entropy"]), (ent * mask).sum() / mask.sum(), rtol=1e-5)
    assert abs(float(m["ref_kl"])) < 1e-7 and abs(float(m["kl_loss"])) < 1e-7


@pytest.mark.parametrize("loss_agg", grpo.LOSS_AGGS)
def test_split_terms_with_global_denominator_equal_whole_batch(loss_agg):
    """The numerator/denominator form lets micro-batches reproduce the whole-batch loss and gradient."""
    logp, old, ref, adv, mask = [jnp.asarray(x, jnp.float32) for x in random_inputs(11, B=8)]
    kw = dict(kl_coef=0.05, loss_agg=loss_agg)

    def whole(lp):
        return grpo.policy_loss(lp, old, ref, adv, mask, **kw)[0]

    def split(lp):
        den = grpo.loss_denominator(mask, loss_agg)
        total = 0.0
        for rows in (slice(0, 3), slice(3, 8)):
            num, _ = grpo.policy_loss_terms(lp[rows], old[rows], ref[rows], adv[rows], mask[rows], **kw)
            total = total + num / den
        return total

    np.testing.assert_allclose(float(split(logp)), float(whole(logp)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(split)(logp)), np.asarray(jax.grad(whole)(logp)), rtol=1e-6, atol=1e-9)


def test_bad_options_name_the_problem():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="loss_agg='mean'"):
        grpo.policy_loss(x, x, x, jnp.zeros(2), x, loss_agg="mean")
    with pytest.raises(ValueError, match="kl_estimator='k2'"):
        grpo.policy_loss(x, x, x, jnp.zeros(2), x, kl_estimator="k2")
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo.policy_loss(x, x, None, jnp.zeros(2), x, kl_coef=0.1)
