"""A scripted ALFWorld agent that searches for things instead of knowing where they are.

An ALFWorld walkthrough goes straight to the receptacle that holds the task's object, which a policy cannot
know from its prompt; a small model imitating walkthroughs learns to guess a receptacle. `Explorer` plays
the same task from what the ReAct prompt shows (the task's classes, the current observation and the
admissible commands), so every one of its actions can be read off the prompt:

* searching: take an object of the task's class when a ``take`` of it is admissible; else open the
  receptacle it stands at when ``open`` is admissible (closed); else go to the next receptacle after the
  current one in the (alphabetical) list of ``go to`` commands, the first one at the start;
* then ``clean / heat / cool`` it at the first receptacle of the appliance's class, or ``use`` the lamp
  (searched for like the object), and ``move`` it to the first receptacle of the target class (opened first
  when closed); for two objects it searches again, never taking from a receptacle of the target class.

The task's classes come from the game's walkthrough (`goal_from_walkthrough`), the same classes the task
sentence names. Used by the demo's warm start (``warmstart.corpus = "explorer"``) as its teacher.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

TRANSFORM_VERBS = ("clean", "heat", "cool")
LAMPS = ("desklamp", "floorlamp")
FALLBACK = "look"  # nothing left to try (never needed on a solvable game)


def object_class(name: str) -> str:
    """"apple 1" -> "apple" (ALFWorld names are a class and an instance number)."""
    return name.rsplit(" ", 1)[0]


@dataclasses.dataclass(frozen=True)
class TaskGoal:
    """What an ALFWorld task asks for, as classes. obj: the object class ("apple"). target: the receptacle
    class it goes to ("" for look tasks). transform: (verb, appliance class), e.g. ("heat", "microwave"),
    or None. lamp: the lamp class of a look task ("" otherwise). count: objects to place (1 or 2)."""

    obj: str
    target: str = ""
    transform: tuple[str, str] | None = None
    lamp: str = ""
    count: int = 1


def goal_from_walkthrough(walkthrough: Sequence[str]) -> TaskGoal:
    """The task's classes from a walkthrough (``take X from R``, ``move X to R``, ``heat X with A``,
    ``use desklamp 1``)."""
    obj, target, transform, lamp, moves = "", "", None, "", 0
    for a in walkthrough:
        verb = a.split(" ", 1)[0]
        if verb == "take" and " from " in a and not obj:
            obj = object_class(a[len("take "):].split(" from ")[0])
        elif verb == "move" and " to " in a:
            target = object_class(a.split(" to ")[-1])
            moves += 1
        elif verb in TRANSFORM_VERBS and " with " in a:
            transform = (verb, object_class(a.split(" with ")[-1]))
        elif verb == "use":
            lamp = object_class(a[len("use "):])
    if not obj:
        raise ValueError(f"walkthrough {list(walkthrough)} takes no object: not an ALFWorld task the explorer knows")
    return TaskGoal(obj=obj, target=target, transform=transform, lamp=lamp, count=max(moves, 1))


class Explorer:
    """One episode of the scripted searcher: `act(admissible)` -> command, then `observe(action, valid)`."""

    def __init__(self, goal: TaskGoal) -> None:
        self.goal = goal
        self.location: str | None = None  # receptacle the agent stands at
        self.held: str | None = None  # object in hand ("apple 1")
        self.transformed = False
        self.placed = 0

    def _next_receptacle(self, gos: list[str]) -> str:
        later = [g for g in gos if self.location is not None and g > self.location]
        return (later or gos)[0]

    def _first_of(self, cls: str, gos: list[str]) -> str | None:
        return next((g for g in gos if object_class(g) == cls), None)

    def act(self, admissible: Sequence[str]) -> str:
        g = self.goal
        gos = [c[len("go to "):] for c in admissible if c.startswith("go to ")]
        opener = f"open {self.location}" if self.location else None
        if self.held is None:  # search for the object
            for c in admissible:
                if c.startswith("take ") and " from " in c:
                    what, source = c[len("take "):].split(" from ", 1)
                    if object_class(what) == g.obj and object_class(source) != g.target:
                        return c
            if opener in admissible:
                return opener
            return f"go to {self._next_receptacle(gos)}" if gos else FALLBACK
        if g.transform and not self.transformed:
            verb, appliance = g.transform
            prefix = f"{verb} {self.held} with "
            for c in admissible:
                if c.startswith(prefix):
                    return c
            dest = self._first_of(appliance, gos)
            if dest:
                return f"go to {dest}"
            return opener if opener in admissible else FALLBACK
        if g.lamp:
            for c in admissible:
                if c.startswith(f"use {g.lamp}"):
                    return c
            return f"go to {self._next_receptacle(gos)}" if gos else FALLBACK
        prefix = f"move {self.held} to "
        for c in admissible:
            if c.startswith(prefix) and object_class(c[len(prefix):]) == g.target:
                return c
        if self.location and object_class(self.location) == g.target and opener in admissible:
            return opener
        dest = self._first_of(g.target, gos)
        return f"go to {dest}" if dest else FALLBACK

    def observe(self, action: str, valid: bool) -> None:
        """Update the state after the engine answered `action` (valid: it changed something)."""
        if not valid:
            return
        if action.startswith("go to "):
            self.location = action[len("go to "):]
        elif action.startswith("take ") and " from " in action:
            self.held = action[len("take "):].split(" from ")[0]
        elif action.startswith("move ") and " to " in action:
            self.held, self.transformed = None, False
            self.placed += 1
        elif action.split(" ", 1)[0] in TRANSFORM_VERBS:
            self.transformed = True
