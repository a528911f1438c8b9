"""ALFWorld (text) through the real `alfworld` package and its TextWorld PDDL engine, one episode at a time.

The engine is built exactly as alfworld's own `AlfredTWEnv` builds it: `textworld.start(game.tw-pddl)` with
`EnvInfos(won, admissible_commands, extras=["gamefile"])` and alfworld's `AlfredDemangler` (object ids ->
"apple 1") and `AlfredInfos` wrappers. Observations are the engine's text, unchanged: the first one is
"-= Welcome to TextWorld, ALFRED! =-\\n\\n<room description>\\n\\nYour task is to: <task>." (set
`strip_banner=True` to drop the welcome line, as verl-agent does).

Per step: reward 1.0 and done=True when the game is won; truncated=True when `max_steps` actions were taken
without winning. An action is *invalid* when it is not among the admissible commands of the state it was
taken in, or the engine answers "Nothing happens." (invalid actions still count as steps).
info: "admissible_commands" (of the new state, sorted), "task_type", "won", "gamefile", "task" (the task
sentence), "task_id", "max_steps".

Run it in worker processes through `rwml_jax.envs.pool.EnvPool("rwml_jax.envs.alfworld_env:AlfworldEnv", ...)`.
"""

from __future__ import annotations

import os
import random
from typing import Any

from rwml_jax.envs import alfworld_memo
from rwml_jax.envs.alfworld_data import GameRef, resolve_game
from rwml_jax.envs.base import StepResult, TaskSpec

BANNER = "-= Welcome to TextWorld, ALFRED! =-"
NOTHING_HAPPENS = "Nothing happens."
TASK_PREFIX = "Your task is to: "
DEFAULT_MAX_STEPS = 50  # verl-agent's evaluation limit; the paper trains with 15 and evaluates with 30


def _import_engine() -> tuple[Any, Any, Any]:
    try:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            f"the ALFWorld adapter needs the `alfworld` package (and its TextWorld engine): "
            f"pip install 'alfworld>=0.4' (or `pip install rwml-jax[envs]`). Import failed: {e}") from e
    return textworld, AlfredDemangler, AlfredInfos


def task_sentence(observation: str) -> str:
    """The task ("put a clean knife in countertop.") from a first observation, or "" if absent."""
    idx = observation.rfind(TASK_PREFIX)
    return observation[idx + len(TASK_PREFIX):].strip() if idx >= 0 else ""


class AlfworldEnv:
    """One ALFWorld text game at a time (implements `rwml_jax.envs.base.TextEnv`).

    Args:
      data_dir: ALFWorld data folder (either layout, see `alfworld_data`); None: $ALFWORLD_DATA. Task ids
        may also be paths to a game.tw-pddl or its trial folder, which need no data_dir.
      max_steps: step limit per episode (actions, valid or not); TaskSpec option ("max_steps", n) overrides.
      strip_banner: drop the "-= Welcome to TextWorld, ALFRED! =-" line from the first observation.
      shuffle_names: ALFWorld's domain randomisation: shuffle the instance numbers ("apple 1" <-> "apple 2")
        with `random.Random(task.seed)`, so the same task and seed always give the same names.
      memoize: cache the engine's pure PDDL translation and grammar parsing in this process
        (`alfworld_memo`; identical outputs, much faster repeated resets and steps).
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, max_steps: int = DEFAULT_MAX_STEPS,
                 strip_banner: bool = False, shuffle_names: bool = False, memoize: bool = True) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self.max_steps = int(max_steps)
        self.strip_banner = strip_banner
        self.shuffle_names = shuffle_names
        self._textworld, self._demangler_cls, self._infos_cls = _import_engine()
        if memoize:
            alfworld_memo.install()
        self._tw: Any = None  # the wrapped textworld environment, built on first reset
        self._loaded: tuple[str, int | None] | None = None  # (gamefile, shuffle seed) loaded in the engine
        self._game: GameRef | None = None
        self._task: TaskSpec | None = None
        self._limit = self.max_steps
        self._steps = 0
        self._finished = True
        self._admissible: list[str] = []
        self._task_sentence = ""

    # -------------------------------------------------------------- TextEnv

    def reset(self, task: TaskSpec) -> StepResult:
        """Load `task.task_id` of `task.split` and return the first observation."""
        self._finished = True  # no running episode until this reset succeeds
        if task.env != "alfworld":
            raise ValueError(f"AlfworldEnv got a task for env {task.env!r}")
        opts = dict(task.options)
        unknown = set(opts) - {"max_steps"}
        if unknown:
            raise ValueError(f"unknown ALFWorld task option(s) {sorted(unknown)}; known: ['max_steps']")
        limit = int(opts.get("max_steps", self.max_steps))
        if limit < 1:
            raise ValueError(f"max_steps option must be >= 1, got {limit}")
        game = resolve_game(self.data_dir, task.split, task.task_id)
        self._load(game.gamefile, seed=task.seed)
        state = self._tw.reset()
        self._game, self._task, self._limit = game, task, limit
        self._steps, self._finished = 0, False
        obs = state["feedback"]
        self._task_sentence = task_sentence(obs)
        if self.strip_banner:
            obs = obs.replace(BANNER, "", 1).lstrip("\n")
        self._admissible = list(state["admissible_commands"])
        won = bool(state["won"])
        if won:  # a game won before any action is a broken game file; report it, don't loop on it
            self._finished = True
        return StepResult(observation=obs, reward=0.0, done=won, truncated=False, valid=True,
                          next_kind="observation", info=self._info(won))

    def preload(self, task: TaskSpec) -> None:
        """Load `task`'s game into the engine without starting it, so that a later `reset(task)` only
        restarts it (the pool calls this in workers with spare time; see `EnvPool`). Ends a running
        episode."""
        if task.env != "alfworld":
            raise ValueError(f"AlfworldEnv got a task for env {task.env!r}")
        self._finished = True
        game = resolve_game(self.data_dir, task.split, task.task_id)
        self._load(game.gamefile, seed=task.seed)

    def step(self, action: str) -> StepResult:
        """Play one command. Raises RuntimeError if no episode is running."""
        if self._finished or self._tw is None:
            raise RuntimeError("AlfworldEnv.step called without a running episode; call reset(task) first")
        if not isinstance(action, str):
            raise TypeError(f"action must be a str, got {type(action).__name__}")
        command = action.strip()
        admissible_before = self._admissible
        state, _score, _done = self._tw.step(command)
        self._steps += 1
        obs = state["feedback"]
        won = bool(state["won"])
        valid = command in admissible_before and obs.strip() != NOTHING_HAPPENS
        self._admissible = list(state["admissible_commands"])
        truncated = (not won) and self._steps >= self._limit
        self._finished = won or truncated
        return StepResult(observation=obs, reward=1.0 if won else 0.0, done=won, truncated=truncated,
                          valid=valid, next_kind="observation", info=self._info(won))

    def close(self) -> None:
        if self._tw is not None:
            try:
                self._tw.close()
            finally:
                self._tw, self._loaded = None, None

    # -------------------------------------------------------------- helpers

    @property
    def admissible_commands(self) -> list[str]:
        """Admissible commands of the current state."""
        return list(self._admissible)

    @property
    def steps_taken(self) -> int:
        return self._steps

    def _load(self, gamefile: str, seed: int) -> None:
        """Build the engine on first use; (re)load the game only when it changed (or names are shuffled)."""
        key = (gamefile, seed if self.shuffle_names else None)
        if self._tw is not None and self._loaded == key:
            return  # reset() rebuilds the game state from the same problem: no need to parse it again
        self._loaded = None  # until the load below succeeds
        saved = random.getstate()
        if self.shuffle_names:  # AlfredDemangler shuffles with the global `random`: tie it to the seed
            random.seed(seed)
        try:
            if self._tw is None:
                infos = self._textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
                self._tw = self._textworld.start(
                    gamefile, request_infos=infos,
                    wrappers=[self._demangler_cls(shuffle=self.shuffle_names), self._infos_cls])
            else:
                self._tw.load(gamefile)
        finally:
            if self.shuffle_names:
                random.setstate(saved)
        self._loaded = key

    def _info(self, won: bool) -> dict[str, Any]:
        assert self._game is not None
        return {
            "admissible_commands": list(self._admissible),
            "task_type": self._game.task_type,
            "won": won,
            "gamefile": self._game.gamefile,
            "task": self._task_sentence,
            "task_id": self._game.task_id,
            "max_steps": self._limit,
        }
