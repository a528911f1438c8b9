"""The text-environment protocol every adapter implements, and the records RWML keeps of each step.

An environment is stepped with *text* (the action the policy generated) and answers with *text* (the next
observation). `TextEnv` is the single-episode protocol an adapter implements; the worker pool
(`rwml_jax.envs.pool`) runs many of them in worker processes and steps them as a batch. Everything that
crosses a process boundary here is a plain dataclass of picklable values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Protocol, runtime_checkable

# What kind of text the environment answered with; RWML picks its reward by this (see rwml.rewards).
NextKind = Literal["observation", "user_reply", "tool_response"]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Which episode to start: an environment, a data split, a task within it and a seed.

    env: "alfworld" or "tau2". split: "train", "valid_seen" (ALFWorld ID), "valid_unseen" (OOD), or
    τ²'s "train"/"test". task_id: the game folder (ALFWorld) or the τ² task id. seed: for the
    environment's own randomness (user simulator sampling, ...).
    """

    env: str
    split: str
    task_id: str
    seed: int = 0
    options: tuple[tuple[str, Any], ...] = ()  # adapter-specific, e.g. (("domain", "retail"),)


@dataclasses.dataclass
class StepResult:
    """What an environment answers to `reset` or `step`.

    observation: the text the agent sees next (s_{t+1}); for `reset`, the task instruction + first
    observation. reward: task-success reward of this step (terminal success 1.0 / 0.0 in both envs).
    done: the episode ended by the environment's own rule (win, τ² stop signal). truncated: ended by the
    step limit, a worker crash or a timeout (never counted as a success). valid: whether the action was
    admissible / well-formed (always True after reset). next_kind: what kind of text `observation` is.
    info: adapter extras, e.g. "admissible_commands" (ALFWorld), "tools", "policy" (τ²), "task_type",
    "won", "error" (why a worker was restarted).
    """

    observation: str
    reward: float = 0.0
    done: bool = False
    truncated: bool = False
    valid: bool = True
    next_kind: NextKind = "observation"
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Transition:
    """One realised step ⟨s_t, a_t, s_{t+1}⟩ with everything later stages need (triplets, filtering).

    `history` is not stored: triplets are rebuilt from consecutive transitions of one episode
    (`episode_id`, `step`).
    """

    episode_id: str
    task: TaskSpec
    step: int
    observation: str
    action: str
    next_observation: str
    next_kind: NextKind
    valid: bool
    reward: float
    done: bool
    truncated: bool
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class TextEnv(Protocol):
    """One episode at a time. Adapters raise `ValueError` naming the bad task id / split.

    Optional: `preload(task) -> None` loads a task's expensive state without starting the episode, so that a
    later `reset(task)` on the same object is cheap (`EnvPool` calls it in workers with spare time;
    `AlfworldEnv` implements it).
    """

    def reset(self, task: TaskSpec) -> StepResult: ...

    def step(self, action: str) -> StepResult: ...

    def close(self) -> None: ...
