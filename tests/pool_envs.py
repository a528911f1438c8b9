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
