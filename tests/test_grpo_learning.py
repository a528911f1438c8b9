"""GRPO learns: a tiny random model, sampled by the real sampler, trained on a verifiable reward (the
reply contains a given token) raises its mean reward far above the start within a few dozen steps."""

from __future__ import annotations

import jax
import numpy as np

from rwml_jax import sharding as sh
from rwml_jax.models import decoder
from rwml_jax.models.config import ModelConfig
from rwml_jax.rl import batch as bt
from rwml_jax.rl.grpo import group_advantages
from rwml_jax.rl.train_state import OptimizerConfig, create_train_state, make_optimizer
from rwml_jax.rl.update import GRPOConfig, make_grpo_step
from rwml_jax.sampling import Sampler

TARGET = 7
GROUPS, GROUP, PROMPT, REPLY, STEPS = 8, 8, 6, 4, 30


def test_grpo_raises_reward_on_verifiable_task():
    cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_norm=True,
                      tie_word_embeddings=True, rope_theta=1e6)
    mesh = sh.make_mesh()
    params = decoder.init_params_sharded(cfg, jax.random.key(0), mesh)
    ref = jax.tree.map(lambda x: x.copy(), params)
    ocfg = OptimizerConfig(learning_rate=3e-3, warmup_steps=3, max_grad_norm=1.0)
    step = make_grpo_step(cfg, GRPOConfig(kl_coef=0.01, kl_estimator="k3"), make_optimizer(ocfg), mesh)
    state = create_train_state(params, step.optimizer, step.state_shardings)
    sampler = Sampler(cfg, max_new_tokens=REPLY, mesh=mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 64, PROMPT).tolist() for _ in range(GROUPS)]
    rows = [p for p in prompts for _ in range(GROUP)]

    rewards_per_step, first_metrics = [], None
    for it in range(STEPS):
        out = sampler.generate(state.params, rows, max_new_tokens=REPLY, temperature=1.0, seed=it, stop_at_eos=False)
        rewards = np.asarray([float(TARGET in r.token_ids) for r in out], np.float32)
        rewards_per_step.append(rewards.mean())
        tokens = np.where(out.tokens[:, :REPLY] >= 0, out.tokens[:, :REPLY], 0)
        cmask = np.arange(REPLY)[None, :] < out.lengths[:, None]
        batch = bt.from_sampler(np.asarray(rows), np.ones((len(rows), PROMPT), np.int32), tokens, cmask)
        batch = bt.with_grpo_fields(batch, np.asarray(group_advantages(rewards, GROUP)), out.logprobs[:, :REPLY])
        state, metrics = step(state, batch, ref)
        if first_metrics is None:
            first_metrics = {k: float(v) for k, v in metrics.items()}

    # The sampler's log-probs are the policy's: before the first update the importance ratio is 1.
    assert first_metrics["sampler_kl"] < 1e-5 and first_metrics["clip_frac"] == 0.0, first_metrics
    start, end = float(np.mean(rewards_per_step[:3])), float(np.mean(rewards_per_step[-3:]))
    assert start < 0.4, rewards_per_step
    assert end > 0.8 and end > start + 0.4, f"mean reward {start:.2f} -> {end:.2f}: {np.round(rewards_per_step, 2)}"
    assert int(state.step) == STEPS
