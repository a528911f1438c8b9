"""The policy side of the agent loop: prompt templates, output parsers and the multi-turn batched rollout."""

from rwml_jax.agent.parse import INVALID_ACTION, ParsedAction, parse_alfworld_action, tau2_agent_action
from rwml_jax.agent.prompts import alfworld_policy_messages, render_plain, tau2_policy_messages
from rwml_jax.agent.rollout import Generation, RolloutResult, RolloutStats, rollout
from rwml_jax.agent.trajectory import Trajectory, Turn

__all__ = [
    "INVALID_ACTION", "Generation", "ParsedAction", "RolloutResult", "RolloutStats", "Trajectory", "Turn",
    "alfworld_policy_messages", "parse_alfworld_action", "render_plain", "rollout", "tau2_agent_action",
    "tau2_policy_messages",
]
