"""The easy-sample filter's keep/drop rule on constructed rewards."""

import numpy as np
import pytest

from rwml_jax.rwml.easy_filter import filter_easy, is_easy, keep_uniform

K = 10


def _rewards(n_easy: int, n_hard: int) -> dict[str, list[float]]:
    """n_easy triplets with all K rewards 1, then n_hard with 9/10, 5/10, 0/10 correct in turn."""
    out = {f"e{i}": [1.0] * K for i in range(n_easy)}
    partial = [9, 5, 0]
    for i in range(n_hard):
        c = partial[i % 3]
        out[f"h{i}"] = [1.0] * c + [0.0] * (K - c)
    return out


def test_default_all_k_correct_is_easy_and_hard_always_kept():
    rewards = _rewards(400, 300)
    res = filter_easy(rewards, tau_easy=1.0, keep_easy_prob=0.1, seed=3)
    assert res.stats.total == 700 and res.stats.easy == 400 and res.stats.hard == 300
    assert all(res.easy[f"e{i}"] for i in range(400))
    assert not any(res.easy[f"h{i}"] for i in range(300))  # 9/10 correct is not "all K correct"
    kept = set(res.kept_ids)
    assert {f"h{i}" for i in range(300)} <= kept
    # exactly the easy ids whose seeded draw is below p are kept
    expect_easy_kept = {f"e{i}" for i in range(400) if keep_uniform(3, f"e{i}") < 0.1}
    assert kept - {f"h{i}" for i in range(300)} == expect_easy_kept
    assert res.stats.easy_kept == len(expect_easy_kept) and res.stats.kept == 300 + len(expect_easy_kept)
    assert 20 <= res.stats.easy_kept <= 60  # ~Binomial(400, 0.1): the draw really is p-biased
    assert res.kept_ids == [t for t in rewards if t in kept]  # input order
    assert res.stats.frac_easy == pytest.approx(400 / 700)


def test_p_zero_drops_all_easy_p_one_keeps_all():
    rewards = _rewards(50, 30)
    res0 = filter_easy(rewards, keep_easy_prob=0.0)
    assert sorted(res0.kept_ids) == sorted(f"h{i}" for i in range(30))
    res1 = filter_easy(rewards, keep_easy_prob=1.0)
    assert res1.kept_ids == list(rewards)


def test_tau_easy_is_configurable():
    rewards = {"a": [1.0] * 10, "b": [1.0] * 9 + [0.0], "c": [1.0] * 5 + [0.0] * 5, "d": [0.0] * 10,
               "e": [0.2, 0.4, 0.6, 0.8, 1.0]}  # ROUGE-grid rewards, mean 0.6 (float sum 3.0000000000000004/5)
    means = filter_easy(rewards, tau_easy=0.5, keep_easy_prob=0.0).mean_rewards
    assert means == pytest.approx({"a": 1.0, "b": 0.9, "c": 0.5, "d": 0.0, "e": 0.6})
    for tau, easy in [(1.0, {"a"}), (0.9, {"a", "b"}), (0.6, {"a", "b", "e"}), (0.5, {"a", "b", "c", "e"}),
                      (0.0, set(rewards))]:  # 0.0 = the paper's literal value: everything is easy
        res = filter_easy(rewards, tau_easy=tau, keep_easy_prob=0.0)
        assert {t for t, e in res.easy.items() if e} == easy, tau
        assert set(res.kept_ids) == set(rewards) - easy, tau
    grid = [0.0, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.8, 0.8, 0.8]  # ROUGE-grid rewards whose true mean is 0.6
    assert float(np.mean(grid)) < 0.6  # ... but the float mean is 0.5999999999999999
    assert is_easy(float(np.mean(grid)), 0.6) and not is_easy(0.59, 0.6)
    res = filter_easy({"g": grid}, tau_easy=0.6, keep_easy_prob=0.0)
    assert res.easy["g"] and res.kept_ids == []


def test_keep_draw_is_reproducible_and_order_independent():
    rewards = _rewards(200, 10)
    a = filter_easy(rewards, keep_easy_prob=0.3, seed=7)
    rev = dict(reversed(list(rewards.items())))
    b = filter_easy(rev, keep_easy_prob=0.3, seed=7)
    assert set(a.kept_ids) == set(b.kept_ids)
    sub = {k: v for k, v in rewards.items() if k.startswith("e1")}  # a subset keeps the same decisions
    c = filter_easy(sub, keep_easy_prob=0.3, seed=7)
    assert set(c.kept_ids) == set(a.kept_ids) & set(sub)
    d = filter_easy(rewards, keep_easy_prob=0.3, seed=8)
    assert set(d.kept_ids) != set(a.kept_ids)


def test_variable_k_and_bad_input():
    res = filter_easy({"x": [1.0, 1.0], "y": [1.0, 0.0, 1.0]}, keep_easy_prob=0.0)
    assert res.kept_ids == ["y"]
    with pytest.raises(ValueError, match="'z' has no filter rewards"):
        filter_easy({"z": []})
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        filter_easy({"z": [1.5]})
    with pytest.raises(ValueError, match="tau_easy"):
        filter_easy({"z": [1.0]}, tau_easy=1.2)
    with pytest.raises(ValueError, match="keep_easy_prob"):
        filter_easy({"z": [1.0]}, keep_easy_prob=-0.1)
