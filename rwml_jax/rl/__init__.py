"""Reinforcement-learning and fine-tuning updates: GRPO losses, the sharded update step, SFT, and one GRPO
iteration.

Modules: `grpo` (advantages and the clipped policy loss, pure functions), `grpo_options` (their option
names), `batch` (packing prompts and completions), `logprobs` (float32 completion log-probs from the
decoder), `shared_prompt` (GRPO groups sharing their prompt), `train_state` (TrainState, AdamW with warm-up
and schedule), `update` (the jitted update step and its GRPO loss), `sft` (the SFT loss), `iteration` (one
GRPO iteration: rollouts -> advantages -> pack -> update, for the rwml stage, policy RL and the benchmark).
"""
