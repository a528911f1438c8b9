"""What a rollout records: `Turn`s (prompt, generated text, parsed action, realised `Transition`) grouped into
`Trajectory`s, with JSON-safe (de)serialisation so the collect stage can write them and later stages read them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from rwml_jax.envs.base import TaskSpec, Transition

SCHEMA_VERSION = 1


def task_to_dict(task: TaskSpec) -> dict[str, Any]:
    return {"env": task.env, "split": task.split, "task_id": task.task_id, "seed": task.seed,
            "options": [[k, v] for k, v in task.options]}


def task_from_dict(d: Mapping[str, Any]) -> TaskSpec:
    return TaskSpec(env=d["env"], split=d["split"], task_id=d["task_id"], seed=int(d.get("seed", 0)),
                    options=tuple((k, v) for k, v in d.get("options", ())))


def transition_to_dict(t: Transition) -> dict[str, Any]:
    d = dataclasses.asdict(t)
    d["task"] = task_to_dict(t.task)
    return d


def transition_from_dict(d: Mapping[str, Any]) -> Transition:
    fields = {f.name for f in dataclasses.fields(Transition)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"transition record has unknown field(s) {sorted(unknown)}")
    return Transition(**{**d, "task": task_from_dict(d["task"]), "info": dict(d.get("info", {}))})


_TRAINING_FIELDS = ("prompt_ids", "completion_ids", "logprobs")  # written only when set


@dataclasses.dataclass
class Turn:
    """One policy turn of an episode.

    prompt: the chat messages the policy saw (None when the rollout was asked not to keep prompts).
    output: the generated text. action: what the environment was stepped with (see rwml_jax.agent.parse).
    format_ok / has_think / format_error: the parser's verdict on the output's format.
    transition: the realised ⟨s_t, a_t, s_{t+1}⟩ (its ``valid`` is the environment's verdict).
    output_tokens: generated token count when the generator reports it. truncated: cut at the token budget.
    prompt_ids / completion_ids / logprobs: what training on the turn needs, when the generator reports it
    (policy RL): the prompt's token ids, the sampled token ids (stop token included) and the sampling
    policy's log-prob of each sampled token ([len(completion_ids)] floats).
    """

    step: int
    prompt: list[dict[str, Any]] | None
    output: str
    action: str
    format_ok: bool
    has_think: bool
    format_error: str | None
    transition: Transition
    output_tokens: int | None = None
    truncated: bool = False  # the output was cut at the token budget (no end-of-turn token)
    prompt_ids: list[int] | None = None
    completion_ids: list[int] | None = None
    logprobs: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "transition"
             and not (f.name in _TRAINING_FIELDS and getattr(self, f.name) is None)}
        d["transition"] = transition_to_dict(self.transition)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Turn:
        return cls(**{**d, "transition": transition_from_dict(d["transition"])})


@dataclasses.dataclass
class Trajectory:
    """One episode played by the policy.

    episode_id: the pool's episode id (also in every transition). task: the TaskSpec it was reset with
    (all N trajectories of a task share it, seed included). sample_index: k in 0..N-1 among them.
    first_observation / reset_info: what `reset` answered (reset_info without bulky fields: τ² keeps domain,
    greeting, the user's known profile and compact tool signatures; ALFWorld keeps task, task type, game).
    success: the episode ended by the environment's own rule with full task reward (ALFWorld won, τ²'s
    evaluator gave 1.0). reward: the final step's task reward. done / truncated: how it ended (truncated:
    step limit, worker crash, or the rollout's own turn limit). error: why it was cut short by a failure.
    provenance: model, config hash, seed, … as given to the rollout plus the rollout's own settings.
    """

    episode_id: str
    task: TaskSpec
    sample_index: int
    first_observation: str
    reset_info: dict[str, Any]
    turns: list[Turn]
    success: bool
    reward: float
    done: bool
    truncated: bool
    error: str | None = None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def env(self) -> str:
        return self.task.env

    @property
    def transitions(self) -> list[Transition]:
        return [t.transition for t in self.turns]

    @property
    def num_steps(self) -> int:
        return len(self.turns)

    @property
    def num_invalid(self) -> int:
        """Steps the environment judged invalid (inadmissible command, bad tool call, malformed output)."""
        return sum(not t.transition.valid for t in self.turns)

    @property
    def num_format_errors(self) -> int:
        """Turns whose output broke the response format (no / unclosed <action>, malformed <tool_call>)."""
        return sum(not t.format_ok for t in self.turns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "episode_id": self.episode_id,
            "task": task_to_dict(self.task),
            "sample_index": self.sample_index,
            "first_observation": self.first_observation,
            "reset_info": self.reset_info,
            "turns": [t.to_dict() for t in self.turns],
            "success": self.success,
            "reward": self.reward,
            "done": self.done,
            "truncated": self.truncated,
            "error": self.error,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Trajectory:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"trajectory record has schema_version {version!r}; this code reads "
                             f"{SCHEMA_VERSION} (re-run the collect stage)")
        return cls(
            episode_id=d["episode_id"], task=task_from_dict(d["task"]), sample_index=int(d["sample_index"]),
            first_observation=d["first_observation"], reset_info=dict(d["reset_info"]),
            turns=[Turn.from_dict(t) for t in d["turns"]], success=bool(d["success"]),
            reward=float(d["reward"]), done=bool(d["done"]), truncated=bool(d["truncated"]),
            error=d.get("error"), provenance=dict(d.get("provenance", {})))
