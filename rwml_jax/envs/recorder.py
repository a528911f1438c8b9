"""Turning consecutive StepResults of a batch of episodes into RWML `Transition`s ⟨s_t, a_t, s_{t+1}⟩.

    rec = TransitionRecorder()
    firsts = pool.reset(tasks);            rec.on_reset(tasks, firsts)
    nexts = pool.step(actions);            new = rec.on_step(actions, nexts)   # list[Transition]

Per slot the recorder remembers the task, the episode id and the last observation, so each step yields the
observation before the action, the action text, the realised next observation, its kind, the action's
validity and the episode id / step index. Episode ids come from the pool (info["episode_id"]) when present.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Sequence

from rwml_jax.envs.base import StepResult, TaskSpec, Transition

# info keys that are bulky or per-step bookkeeping and are not copied into Transition.info
_SKIP_INFO = frozenset({"admissible_commands", "tools", "policy"})


@dataclasses.dataclass
class _Open:
    task: TaskSpec
    episode_id: str
    step: int
    observation: str


class TransitionRecorder:
    """Keeps the open episode of every slot and emits a Transition per stepped slot.

    Args:
      keep_info: copy the step's info into Transition.info (minus bulky keys such as the admissible
        commands, tool schemas and policy text).
    """

    def __init__(self, keep_info: bool = True) -> None:
        self.keep_info = keep_info
        self._open: dict[int, _Open] = {}
        self._tag = uuid.uuid4().hex[:6]
        self._counter = itertools.count()
        self.transitions: list[Transition] = []  # everything recorded so far, in order

    def on_reset(self, tasks: Sequence[TaskSpec | None], results: Sequence[StepResult | None]) -> None:
        """Open an episode in every slot i where tasks[i] and results[i] are not None."""
        if len(tasks) != len(results):
            raise ValueError(f"{len(tasks)} tasks but {len(results)} reset results")
        for i, (task, res) in enumerate(zip(tasks, results)):
            if task is None or res is None:
                continue
            if res.done or res.truncated:  # could not start (worker crash during reset)
                self._open.pop(i, None)
                continue
            eid = res.info.get("episode_id") or f"{self._tag}-{next(self._counter):07d}"
            self._open[i] = _Open(task=task, episode_id=str(eid), step=0, observation=res.observation)

    def on_step(self, actions: Sequence[str | None], results: Sequence[StepResult | None]) -> list[Transition]:
        """Record one Transition per slot with an action and a result; closes finished episodes."""
        if len(actions) != len(results):
            raise ValueError(f"{len(actions)} actions but {len(results)} step results")
        out: list[Transition] = []
        for i, (action, res) in enumerate(zip(actions, results)):
            if action is None or res is None:
                continue
            ep = self._open.get(i)
            if ep is None:
                raise ValueError(f"slot {i} was stepped but has no open episode (call on_reset first)")
            info = ({k: v for k, v in res.info.items() if k not in _SKIP_INFO} if self.keep_info else {})
            t = Transition(episode_id=ep.episode_id, task=ep.task, step=ep.step, observation=ep.observation,
                           action=action, next_observation=res.observation, next_kind=res.next_kind,
                           valid=res.valid, reward=res.reward, done=res.done, truncated=res.truncated,
                           info=info)
            out.append(t)
            if res.done or res.truncated:
                del self._open[i]
            else:
                ep.step += 1
                ep.observation = res.observation
        self.transitions.extend(out)
        return out

    def open_slots(self) -> list[int]:
        """Slots with an episode still running."""
        return sorted(self._open)
