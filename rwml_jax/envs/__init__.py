"""Host-side text environments (ALFWorld, τ²-Bench) behind one batched protocol."""

from rwml_jax.envs.base import NextKind, StepResult, TaskSpec, TextEnv, Transition

ENV_NAMES = ("alfworld", "tau2")  # the environments a recipe's env.name selects
TAU2_DOMAINS = ("airline", "retail", "telecom")  # τ² domains with training tasks

__all__ = ["ENV_NAMES", "TAU2_DOMAINS", "NextKind", "StepResult", "TaskSpec", "TextEnv", "Transition"]
