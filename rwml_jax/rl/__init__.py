"""Reinforcement-learning and fine-tuning updates: GRPO losses, the sharded update step, SFT.

Modules: `grpo` (advantages and the clipped policy loss, pure functions), `batch` (packing prompts and
completions), `logprobs` (float32 completion log-probs from the decoder), `train_state` (TrainState,
AdamW with warm-up and schedule), `update` (the jitted GRPO step), `sft` (the SFT step).
"""
