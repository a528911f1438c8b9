"""A scripted text env for the pool's scheduling tests: its reset time and failure are set by the task id,
so which worker runs which reset is deterministic (the ALFWorld tests cover the real engine in the pool).

Task ids: "sleep:<seconds>" (reset takes that long), "die" (the worker process exits during the reset).
Observations name the worker process that produced them.
"""

from __future__ import annotations

import os
import time

from rwml_jax.envs.base import StepResult, TaskSpec


class ScriptedEnv:
    def __init__(self) -> None:
        self.task: TaskSpec | None = None

    def reset(self, task: TaskSpec) -> StepResult:
        if task.task_id == "die":
            os._exit(3)
        kind, _, arg = task.task_id.partition(":")
        if kind != "sleep":
            raise ValueError(f"unknown scripted task id {task.task_id!r}")
        time.sleep(float(arg))
        self.task = task
        return StepResult(observation=f"{task.task_id} reset in pid {os.getpid()}")

    def step(self, action: str) -> StepResult:
        if self.task is None:
            raise ValueError("step before reset")
        return StepResult(observation=f"{action} in pid {os.getpid()}")

    def close(self) -> None:
        self.task = None


class CrashOnceAlfworldEnv:
    """The real ALFWorld env, except that the worker process dies at the first step of `crash_task` the
    first time (a marker file `marker` remembers it): a worker crash in the middle of an evaluation."""

    def __init__(self, crash_task: str, marker: str, **kwargs) -> None:
        from rwml_jax.envs.alfworld_env import AlfworldEnv

        self.env = AlfworldEnv(**kwargs)
        self.crash_task, self.marker = crash_task, marker
        self.task: TaskSpec | None = None

    def reset(self, task: TaskSpec) -> StepResult:
        self.task = task
        return self.env.reset(task)

    def step(self, action: str) -> StepResult:
        assert self.task is not None
        if self.task.task_id == self.crash_task:
            try:  # created atomically: of two workers stepping the task at once, exactly one dies
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(9)
        return self.env.step(action)

    def close(self) -> None:
        self.env.close()
