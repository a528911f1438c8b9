"""Host-side text environments (ALFWorld, τ²-Bench) behind one batched protocol."""

from rwml_jax.envs.base import NextKind, StepResult, TaskSpec, TextEnv, Transition

__all__ = ["NextKind", "StepResult", "TaskSpec", "TextEnv", "Transition"]
