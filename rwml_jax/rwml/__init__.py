"""RWML proper: world-model triplets and prompts, the easy-sample filter, sim-to-real rewards.

The reward API is re-exported lazily (importing this package stays cheap):
`sim_to_real_reward`, `rouge_reward`, `compute_rewards`, `RewardConfig`,
`extract_next_state` from `rwml_jax.rwml.rewards`, `JudgeReward` from `rwml_jax.rwml.judge`, and `EmbeddingCache`
from `rwml_jax.rwml.embed_cache`.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "sim_to_real_reward": "rwml_jax.rwml.rewards",
    "rouge_reward": "rwml_jax.rwml.rewards",
    "compute_rewards": "rwml_jax.rwml.rewards",
    "RewardConfig": "rwml_jax.rwml.rewards",
    "RewardBatch": "rwml_jax.rwml.rewards",
    "JudgeReward": "rwml_jax.rwml.judge",
    "extract_next_state": "rwml_jax.rwml.rewards",
    "EmbeddingCache": "rwml_jax.rwml.embed_cache",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rwml_jax.rwml' has no attribute {name!r}")


__all__ = sorted(_LAZY)
