"""What an evaluation plays: the episodes of a split (ALFWorld games / τ² test tasks), the env factory for
the pool's workers, and the classification of τ² tool calls.

ALFWorld: the games of `split` under a data folder (official or offline layout, or generated games; see
`rwml_jax.envs.alfworld_data`), each fully parsed first, so a game file that cannot be loaded is named and
counted as a failed episode instead of being left out; the pool's envs are wrapped in `GuardedEnv`, so a
task that fails only when the engine loads it is counted the same way instead of aborting the evaluation. τ²: the tasks of τ²'s own ``test`` split of each
domain, the user simulator given by a spec (`rwml_jax.envs.user_spec`): "scripted" (offline: the user side of the
task's gold conversation; then "###STOP###"), "litellm:<model>" (the official simulator, network),
"local:<model>" (served by the caller's process) or "scripted:<file>".
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

from rwml_jax.envs import TAU2_DOMAINS
from rwml_jax.envs.alfworld_data import normalize_split, scan_games
from rwml_jax.envs.base import StepResult, TaskSpec
from rwml_jax.envs.pool import resolve_factory
from rwml_jax.envs.replay import ALFWORLD_FACTORY  # noqa: F401  (re-exported: the factory evaluations play ALFWorld through)
from rwml_jax.envs.tau2_parse import parse_turn
from rwml_jax.evaluation.metrics import INVALID_CALL_KINDS

GUARDED_FACTORY = "rwml_jax.evaluation.tasks:GuardedEnv"
LOAD_ERROR = "cannot load task "  # prefix of the error of an episode whose task failed to load at reset
# τ²'s env factory (every stage's): users from their specs, kwargs user=, max_steps=, max_messages=, max_errors=,
# endpoints= (the servers of local users, rwml_jax.train.served_models.serve_users)
TAU2_FACTORY = "rwml_jax.envs.tau2_env:make_env"


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """One task of the evaluated split. group: ALFWorld task type / τ² domain. load_error: why the game
    or task cannot be loaded (then it is never played and scores as a failure)."""

    task_id: str
    group: str
    spec: TaskSpec
    load_error: str | None = None


def alfworld_tasks(data: str | os.PathLike | None, split: str, *, task_types: Sequence[str] | None = None,
                   limit: int | None = None) -> list[EvalTask]:
    """Every game of `split` (the first `limit` by task id), broken ones included with their error."""

    split = normalize_split(split)
    games, broken = scan_games(data, split, tuple(task_types) if task_types else None, full_check=True)
    tasks = [EvalTask(g.task_id, g.task_type, TaskSpec("alfworld", split, g.task_id)) for g in games]
    tasks += [EvalTask(b.task_id, b.task_type, TaskSpec("alfworld", split, b.task_id),
                       load_error=f"cannot load {b.gamefile}: {b.error}") for b in broken]
    tasks.sort(key=lambda t: t.task_id)
    return tasks[:limit] if limit is not None else tasks


def tau2_tasks(domains: Sequence[str], split: str = "test", *, limit: int | None = None) -> list[EvalTask]:
    """τ²'s `split` tasks of each domain (the first `limit` per domain, in τ²'s order)."""
    from rwml_jax.envs.tau2_env import list_task_ids

    out = []
    for d in domains:
        if d not in TAU2_DOMAINS:
            raise ValueError(f"unknown τ² domain {d!r}; expected some of {TAU2_DOMAINS}")
        ids = list_task_ids(d, split)
        out += [EvalTask(t, d, TaskSpec("tau2", split, t, options=(("domain", d),))) for t in ids[:limit]]
    return out


class GuardedEnv:
    """An env (built by `factory(**kwargs)`) whose `reset` never raises: a task that fails to load (an
    ALFWorld game whose PDDL does not parse, a τ² task the package rejects) ends at reset with
    ``info["error"] = LOAD_ERROR + "<task id>: <exception>"``, so the evaluation counts it by name instead of
    aborting the batch. Everything else is the wrapped env's (``preload`` included, when it has one)."""

    def __init__(self, factory: str, **kwargs: Any) -> None:
        self.env = resolve_factory(factory)(**kwargs)

    def reset(self, task: TaskSpec) -> StepResult:
        try:
            return self.env.reset(task)
        except Exception as e:  # noqa: BLE001 - reported per task, by name
            return StepResult(observation="", truncated=True, valid=False,
                              info={"error": f"{LOAD_ERROR}{task.task_id}: {type(e).__name__}: {e}"})

    def step(self, action: str) -> StepResult:
        return self.env.step(action)

    def close(self) -> None:
        self.env.close()

    def __getattr__(self, name: str) -> Any:  # preload, admissible_commands, ...
        return getattr(self.__dict__["env"], name)


@functools.lru_cache(maxsize=8)
def tool_schemas(domain: str) -> dict[str, dict[str, Any]]:
    """{tool name: JSON schema of its arguments} of the agent's tools in τ² `domain`."""
    from tau2.registry import registry

    return {t.openai_schema["function"]["name"]: t.openai_schema["function"]["parameters"]
            for t in registry.get_env_constructor(domain)().get_tools()}


def classify_tool_calls(action: str, domain: str) -> tuple[int, dict[str, int]]:
    """(tool calls in an agent turn, invalid ones by kind): "unparsable" (a <tool_call> block that is not
    JSON with a name and an arguments object), "unknown_tool" (no such tool in the domain), "schema" (the
    arguments fail the tool's JSON schema: missing / extra / mistyped fields)."""
    import jsonschema

    schemas = tool_schemas(domain)
    bad = dict.fromkeys(INVALID_CALL_KINDS, 0)
    calls = parse_turn(action).calls
    for c in calls:
        if not c.ok:
            bad["unparsable"] += 1
        elif c.name not in schemas:
            bad["unknown_tool"] += 1
        else:
            try:
                jsonschema.validate(c.arguments, schemas[c.name])
            except jsonschema.ValidationError:
                bad["schema"] += 1
    return len(calls), bad
