"""The shared GRPO iteration (`rwml_jax.rl.iteration`): advantages by group id against NumPy, one
iteration on a tiny random model sampled by the real sampler, and equality with the same update built by
hand (pack + with_grpo_fields + step), per-row and with shared prompts."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rwml_jax import sharding as sh
from rwml_jax.models import decoder
from rwml_jax.models.config import ModelConfig
from rwml_jax.rl import batch as bt
from rwml_jax.rl import grpo
from rwml_jax.rl.iteration import Rollouts, grpo_iteration, update_from_rollouts
from rwml_jax.rl.train_state import OptimizerConfig, create_train_state, make_optimizer
from rwml_jax.rl.update import GRPOConfig, make_grpo_step
from rwml_jax.sampling import Sampler
from rwml_jax.train.policy import Completion

VOCAB, GROUP, REPLY, PROMPT_MULTIPLE = 64, 4, 6, 8
PROMPTS = [[11, 12, 13, 14, 15], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38]]  # ragged: left padding
STOPS = tuple(range(14))  # ~20 % of tokens end a reply, so replies are ragged too


def np_advantages(rewards, group_ids, normalize_std=True, eps=1e-6, ddof=1):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for g in set(group_ids):
        rows = [i for i, x in enumerate(group_ids) if x == g]
        r = rewards[rows]
        a = r - r.mean()
        if normalize_std:
            a = a / (r.std(ddof=ddof) + eps)
        out[rows] = a
    return out


# ---------------------------------------------------------------------------------------------------
# (a) advantages by group id
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize_std", [True, False])
def test_advantages_interleaved_groups_of_different_sizes_match_numpy(normalize_std):
    rng = np.random.default_rng(0)
    group_ids = np.array(["b", "a", "c", "a", "b", "c", "a", "b", "b", "c", "a", "a"])  # sizes 5, 4, 3
    rewards = rng.normal(size=len(group_ids))
    got = grpo.advantages(rewards, group_ids, normalize_std=normalize_std)
    assert got.dtype == np.float32 and got.shape == rewards.shape
    np.testing.assert_allclose(got, np_advantages(rewards, list(group_ids), normalize_std), rtol=1e-5, atol=1e-6)


def test_advantages_of_contiguous_groups_are_group_advantages_exactly():
    rewards = np.random.default_rng(1).integers(0, 3, 24).astype(np.float64) / 2
    want = np.asarray(grpo.group_advantages(rewards, 8))
    np.testing.assert_array_equal(grpo.advantages(rewards, np.repeat([0, 1, 2], 8)), want)
    # The same groups, interleaved: each row keeps its value.
    perm = np.random.default_rng(2).permutation(24)
    np.testing.assert_array_equal(grpo.advantages(rewards[perm], np.repeat([0, 1, 2], 8)[perm]), want[perm])


def test_advantages_errors():
    with pytest.raises(ValueError, match=r"groups \[7\] have 1 row"):
        grpo.advantages(np.array([1.0, 0.0, 1.0]), np.array([3, 3, 7]))
    np.testing.assert_array_equal(grpo.advantages(np.array([1.0, 0.0, 1.0]), np.array([3, 3, 7]), normalize_std=False),
                                  [0.5, -0.5, 0.0])
    with pytest.raises(ValueError, match="same length"):
        grpo.advantages(np.zeros(3), np.zeros(2))


def test_episode_advantages_are_computed_over_episodes_and_given_to_every_turn():
    # Multi-turn rows: episodes 10..15 of tasks "x" / "y" (3 episodes each), turns interleaved, episodes
    # of different lengths; an episode's turns all carry its terminal reward.
    episode = np.array([10, 13, 10, 11, 14, 12, 10, 15, 13, 11, 12, 15, 15])
    task = {10: "x", 11: "x", 12: "x", 13: "y", 14: "y", 15: "y"}
    success = {10: 1.0, 11: 0.0, 12: 0.0, 13: 1.0, 14: 1.0, 15: 0.0}
    rows = len(episode)
    ro = Rollouts(prompt_ids=[[1, 2]] * rows, completion_ids=[[3]] * rows, old_logp=[np.zeros(1)] * rows,
                  rewards=[success[e] for e in episode], group_ids=[task[e] for e in episode], episode_ids=episode)
    eps = sorted(task)
    per_episode = np_advantages([success[e] for e in eps], [task[e] for e in eps])
    want = np.array([per_episode[eps.index(e)] for e in episode])
    np.testing.assert_allclose(ro.advantages(), want, rtol=1e-5, atol=1e-6)
    # Per-row normalisation would weigh long episodes more: not what multi-turn GRPO does.
    assert not np.allclose(want, np_advantages(ro.rewards, list(ro.group_ids)), atol=1e-3)
    with pytest.raises(ValueError, match="differ in reward"):
        Rollouts(prompt_ids=[[1]] * 2, completion_ids=[[3]] * 2, old_logp=[np.zeros(1)] * 2, rewards=[1.0, 0.0],
                 group_ids=[0, 0], episode_ids=[5, 5])
    with pytest.raises(ValueError, match="row 1: 1 completion tokens but 2 log-probs"):
        Rollouts(prompt_ids=[[1]] * 2, completion_ids=[[3]] * 2, old_logp=[np.zeros(1), np.zeros(2)],
                 rewards=[1.0, 0.0], group_ids=[0, 0])


# ---------------------------------------------------------------------------------------------------
# (b), (c) one iteration on a tiny random model
# ---------------------------------------------------------------------------------------------------

def toy_score(completions):
    """Deterministic in the sampled ids: spreads rewards within groups; also reports an extra metric."""
    rewards = np.array([(sum(c.ids) % 5) / 4 for c in completions])
    return rewards, {"toy_short": float(np.mean([len(c.ids) < REPLY for c in completions]))}


class Tiny:
    """A 2-layer random model, its sampler and a GRPO step with a KL reference."""

    def __init__(self, prompt_group_size: int = 0, temperature: float = 1.0, learner_temperature: float | None = None):
        self.cfg = ModelConfig(model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               qk_norm=True, tie_word_embeddings=True, rope_theta=1e6)
        self.mesh = sh.make_mesh()
        self.init = decoder.init_params_sharded(self.cfg, jax.random.key(0), self.mesh)
        self.ref = jax.tree.map(lambda x: x.copy(), self.init)
        opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, max_grad_norm=1.0))
        self.temperature = temperature
        learner = temperature if learner_temperature is None else learner_temperature
        self.step = make_grpo_step(self.cfg, GRPOConfig(kl_coef=0.05, kl_estimator="k3", prompt_group_size=prompt_group_size,
                                                        temperature=learner), opt, self.mesh)
        self.sampler = Sampler(self.cfg, max_new_tokens=REPLY, mesh=self.mesh)

    def state(self):
        return create_train_state(jax.tree.map(lambda x: x.copy(), self.init), self.step.optimizer,
                                  self.step.state_shardings)

    def sample(self, params, prompts, n, seed):
        out = self.sampler.generate(params, prompts, max_new_tokens=REPLY, temperature=self.temperature, seed=seed,
                                    stop_token_ids=STOPS, stop_at_eos=False, num_samples=n)
        return [Completion(r.token_ids, r.logprobs, "") for r in out]


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_grpo_iteration_packs_rollouts_and_updates():
    tiny = Tiny()
    seen = []

    def spy_step(state, batch, *ref):
        seen.append(batch)
        return tiny.step(state, batch, *ref)

    state = tiny.state()
    before = host(state.params)
    state, metrics, ro = grpo_iteration(state, PROMPTS, sample=tiny.sample, score=toy_score, group_size=GROUP,
                                        step_fn=spy_step, pad_id=0, completion_len=REPLY, seed=3,
                                        prompt_multiple=PROMPT_MULTIPLE, ref_params=tiny.ref)

    B = len(PROMPTS) * GROUP
    assert ro.num_rows == B and [list(p) for p in ro.prompt_ids] == [p for p in PROMPTS for _ in range(GROUP)]
    np.testing.assert_array_equal(ro.group_ids, np.repeat(np.arange(len(PROMPTS)), GROUP))
    lengths = np.array([len(c) for c in ro.completion_ids])
    assert lengths.min() < REPLY and lengths.max() > 0, lengths  # ragged replies exercise the masks
    rewards, _ = toy_score([Completion(c, np.zeros(len(c)), "") for c in ro.completion_ids])
    np.testing.assert_array_equal(ro.rewards, rewards)

    (batch,) = seen
    P = 16  # longest prompt (9) rounded up to PROMPT_MULTIPLE
    assert batch["input_ids"].shape == (B, P + REPLY)
    np.testing.assert_array_equal(batch["completion_start"], np.full(B, P))
    np.testing.assert_array_equal(batch["completion_mask"].sum(1), lengths)
    np.testing.assert_allclose(batch["advantages"], np_advantages(rewards, list(ro.group_ids)), rtol=1e-5, atol=1e-6)
    for b in range(B):
        p, c = ro.prompt_ids[b], ro.completion_ids[b]
        np.testing.assert_array_equal(batch["input_ids"][b, P - len(p):P], p)
        np.testing.assert_array_equal(batch["attention_mask"][b], np.r_[np.zeros(P - len(p)), np.ones(len(p)),
                                                                        np.ones(len(c)), np.zeros(REPLY - len(c))])
        np.testing.assert_array_equal(batch["input_ids"][b, P:P + len(c)], c)
        np.testing.assert_array_equal(batch["old_logp"][b], np.r_[ro.old_logp[b], np.zeros(REPLY - len(c))])

    # The sampler's log-probs are the policy's at this step: the importance ratio starts at 1.
    assert metrics["sampler_kl"] < 1e-5 and metrics["clip_frac"] == 0.0, metrics
    assert metrics["tokens"] == lengths.sum() and int(state.step) == 1
    assert metrics["reward_mean"] == pytest.approx(rewards.mean()) and metrics["reward_std"] == pytest.approx(rewards.std())
    groups = rewards.reshape(-1, GROUP)
    assert metrics["frac_groups_no_signal"] == pytest.approx(np.mean(groups.std(1) == 0))
    assert metrics["frac_groups_any_correct"] == pytest.approx(np.mean(groups.max(1) > 0))
    assert metrics["toy_short"] == pytest.approx(np.mean(lengths < REPLY))
    assert metrics["completion_len_mean"] == pytest.approx(lengths.mean())
    assert metrics["completion_len_max"] == lengths.max()
    for k in ("time/generate_s", "time/reward_s", "time/pack_s", "time/update_s", "tokens_per_s"):
        assert metrics[k] > 0, k
    assert metrics["time/step_s"] >= metrics["time/generate_s"] + metrics["time/update_s"]
    after = host(state.params)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert all(changed), f"{sum(changed)} of {len(changed)} parameter arrays changed"


def test_sampler_logprobs_are_the_trained_policy_at_the_rollout_temperature():
    """Rollouts at temperature 1.6: the sampler's log-probs equal the learner's (the importance ratio starts
    at 1) when the update trains softmax(logits / 1.6); a learner at temperature 1 sees another policy."""
    kl = {}
    for learner in (1.6, 1.0):
        tiny = Tiny(temperature=1.6, learner_temperature=learner)
        _, m, _ = grpo_iteration(tiny.state(), PROMPTS, sample=tiny.sample, score=toy_score, group_size=GROUP,
                                 step_fn=tiny.step, pad_id=0, completion_len=REPLY, seed=3,
                                 prompt_multiple=PROMPT_MULTIPLE, ref_params=tiny.ref)
        kl[learner] = abs(m["sampler_kl"])
        if learner == 1.6:
            assert m["clip_frac"] == 0.0 and m["max_ratio"] == pytest.approx(1.0, abs=1e-4), m
    assert kl[1.6] < 1e-5 and kl[1.0] > 1e-4, kl  # (a random model: near-uniform logits, a small gap)


@pytest.mark.parametrize("shared", [False, True], ids=["per-row", "shared-prompts"])
def test_grpo_iteration_equals_the_update_built_by_hand(shared):
    tiny = Tiny(prompt_group_size=GROUP if shared else 0)
    seed = 5

    # By hand, as the rwml stage did before the shared iteration.
    comps = tiny.sample(tiny.init, PROMPTS, GROUP, seed)
    rewards, _ = toy_score(comps)
    adv = np.asarray(grpo.group_advantages(rewards, GROUP))
    rows = [p for p in PROMPTS for _ in range(GROUP)]
    batch = bt.pack(rows, [c.ids for c in comps], prompt_len=16, completion_len=REPLY, layout="split", pad_id=0)
    batch = bt.with_grpo_fields(batch, adv, bt.pad_logprobs([c.logprobs for c in comps], REPLY))
    want_state, want_m = tiny.step(tiny.state(), batch, tiny.ref)
    want = host(want_state.params)

    got_state, got_m, ro = grpo_iteration(tiny.state(), PROMPTS, sample=tiny.sample, score=toy_score,
                                          group_size=GROUP, step_fn=tiny.step, pad_id=0, completion_len=REPLY,
                                          seed=seed, prompt_multiple=PROMPT_MULTIPLE, ref_params=tiny.ref)
    assert [list(c) for c in ro.completion_ids] == [c.ids for c in comps]
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(host(got_state.params))):
        np.testing.assert_array_equal(a, b)
    assert got_m["loss"] == float(want_m["loss"])

    # The same rollouts through the policy-RL entry point: same update.
    again, m = update_from_rollouts(tiny.step, tiny.state(), ro, ro.advantages(), pad_id=0, completion_len=REPLY,
                                    prompt_len=16, ref_params=tiny.ref)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(host(again.params))):
        np.testing.assert_array_equal(a, b)
    assert m["loss"] == float(want_m["loss"])
