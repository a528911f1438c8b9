"""World-model triplets ⟨s≤t, a_t, s_{t+1}⟩ from the policy's own trajectories, and their validation split.

Construction (paper, Stage 0): every turn t of every trajectory gives one triplet whose context s≤t is the
task instruction plus the last H (state, action) pairs *before* s_t, then the current state s_t; a_t is the
action taken and s_{t+1} the state the environment really returned. H = ``history_length`` (config
``triplets.history_length``; verl-agent shows 2); H = 0 keeps only the task and s_t.

* ALFWorld: states are the engine's observations (the first one without the welcome banner); the task is
  the task sentence. kind = "observation".
* τ²: states are what the agent saw — the user's replies and the tool responses; actions are the agent's
  visible turns (message or ``<tool_call>`` blocks, reasoning removed). kind = "user_reply" or
  "tool_response" (τ²'s text for an empty agent turn is an "observation"). The context keeps the domain, the
  user's *known* profile (name, zip, … — never the hidden intent), the agent's greeting and compact tool
  signatures for the world-model prompt.
* τ² tool responses are masked to their OpenAPI-style schema (`rwml_jax.envs.schema_mask.mask_to_schema`) in
  the *target* when ``mask_tool_schema`` is on: the world model learns the structure of a response, not
  database values it cannot know. Several responses of one turn are masked one by one and wrapped in
  ``<tool_response>`` blocks exactly as the τ² adapter renders them. Non-JSON responses (τ²'s "Error: …",
  plain strings) stay as they are. States in the context keep their real values (the agent saw them), unless
  ``mask_history`` is set. The unmasked target is kept in ``raw_next_state``.
* Invalid actions (inadmissible commands, bad tool calls, malformed outputs) give triplets with
  ``valid=False``; ``drop_invalid`` removes them. Steps that ended in an environment failure (a crashed or
  hung worker, a τ² user-simulator error: ``info["error"]``) have no real next state and never give a triplet.

Validation split (`split_triplets`): exactly round(val_fraction · n) triplets go to validation, chosen by a
seeded permutation of the sorted triplet ids, so the split depends only on the set of ids and the seed
(not on input order) and train / validation are disjoint. ``by="task"`` is the default; ``by="triplet"`` (the paper's wording: 10 % of
triplets) may put near-identical triplets of the same task (N trajectories per task replay the same game)
on both sides; ``by="task"`` assigns whole tasks to one side (tasks shuffled with the seed, added to
validation until it holds round(val_fraction · n) triplets or more), so validation measures generalisation to
unseen tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from rwml_jax.agent.prompts import strip_banner
from rwml_jax.agent.trajectory import Trajectory
from rwml_jax.envs.base import NextKind, Transition
from rwml_jax.envs.schema_mask import mask_to_schema

SplitBy = Literal["triplet", "task"]
SPLIT_BY: tuple[str, ...] = ("triplet", "task")
KINDS: tuple[str, ...] = ("observation", "user_reply", "tool_response")


@dataclasses.dataclass(frozen=True)
class HistoryStep:
    """One earlier (state, action) pair of the context; state_kind says what the state was."""

    state: str
    action: str
    state_kind: NextKind = "observation"


@dataclasses.dataclass(frozen=True)
class Triplet:
    """One world-model example ⟨task + last H (state, action) pairs + s_t, a_t, s_{t+1}⟩.

    id: "<episode_id>:<step>", unique per turn. env: "alfworld" | "tau2". kind: what s_{t+1} is
    (observation / user_reply / tool_response; selects the reward). task: the instruction (ALFWorld task
    sentence; τ²: empty, the context carries the profile). history: the last H pairs before s_t, oldest
    first. state / state_kind: s_t. action: a_t. next_state: the target s_{t+1} (schema-masked for τ² tool
    responses when masking is on). raw_next_state: the real s_{t+1} when masking changed it, else None.
    valid: the environment accepted a_t. episode_id / step / task_id / task_split: provenance.
    context: env-specific prompt fields (τ²: domain, user_known_info, greeting, tool_signatures).
    """

    id: str
    env: str
    kind: NextKind
    task: str
    history: tuple[HistoryStep, ...]
    state: str
    state_kind: NextKind
    action: str
    next_state: str
    valid: bool
    episode_id: str
    step: int
    task_id: str
    task_split: str
    context: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    raw_next_state: str | None = None

    @property
    def task_key(self) -> str:
        """Identifies the task (for splitting by task): env, split, domain and task id."""
        domain = self.context.get("domain", "")
        return f"{self.env}/{self.task_split}/{domain}/{self.task_id}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["history"] = [dataclasses.asdict(h) for h in self.history]
        d["context"] = dict(self.context)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Triplet:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        missing = fields - set(d) - {"context", "raw_next_state"}
        if unknown or missing:
            raise ValueError(f"triplet record {d.get('id')!r}: unknown fields {sorted(unknown)}, "
                             f"missing fields {sorted(missing)}")
        if d["kind"] not in KINDS:
            raise ValueError(f"triplet {d['id']!r} has kind {d['kind']!r}; expected one of {KINDS}")
        return cls(**{**d, "history": tuple(HistoryStep(**h) for h in d["history"]),
                      "context": dict(d.get("context", {}))})


def mask_tool_response(next_state: str, tool_messages: Sequence[Mapping[str, Any]] | None) -> str:
    """Mask one τ² tool-response state to its schema (one block per call when the turn made several)."""
    if tool_messages and len(tool_messages) > 1:
        return "\n".join(f"<tool_response>\n{mask_to_schema(str(m.get('content', '')))}\n</tool_response>"
                         for m in tool_messages)
    return mask_to_schema(next_state)


def _state_text(env: str, t: Transition) -> str:
    return strip_banner(t.observation) if env == "alfworld" and t.step == 0 else t.observation


def triplets_from_episode(transitions: Sequence[Transition], *, history_length: int = 2,
                          task: str = "", context: Mapping[str, Any] | None = None,
                          mask_tool_schema: bool = True, mask_history: bool = False,
                          drop_invalid: bool = False) -> list[Triplet]:
    """The triplets of one episode's transitions (consecutive steps 0..T-1 of one episode id)."""
    if history_length < 0:
        raise ValueError(f"history_length must be >= 0, got {history_length}")
    if not transitions:
        return []
    trs = sorted(transitions, key=lambda t: t.step)
    eid = trs[0].episode_id
    for i, t in enumerate(trs):
        if t.episode_id != eid:
            raise ValueError(f"transitions of several episodes given together ({eid!r} and {t.episode_id!r})")
        if t.step != i:
            raise ValueError(f"episode {eid!r}: transition steps are not 0..{len(trs) - 1} (found step "
                             f"{t.step} at position {i}); a turn is missing")
    env = trs[0].task.env
    ctx = dict(context or {})
    if env == "alfworld" and not task:
        task = str(trs[0].info.get("task", "")) or _alfworld_task(trs[0].observation)
    first_kind: NextKind = "user_reply" if env == "tau2" else "observation"

    def masked(text: str, kind: str, tr: Transition) -> str:
        return mask_tool_response(text, tr.info.get("tool_messages")) if kind == "tool_response" else text

    states: list[tuple[str, NextKind]] = [(_state_text(env, trs[0]), first_kind)]
    for t in trs:
        states.append((t.next_observation, t.next_kind))
    out: list[Triplet] = []
    for i, t in enumerate(trs):
        if t.info.get("error"):  # no real next state: the worker crashed / the user simulator failed
            continue
        if drop_invalid and not t.valid:
            continue
        lo = max(0, i - history_length)
        hist = []
        for j in range(lo, i):
            s, k = states[j]
            if mask_history and mask_tool_schema and j > 0:
                s = masked(s, k, trs[j - 1])
            hist.append(HistoryStep(state=s, action=trs[j].action, state_kind=k))
        state, state_kind = states[i]
        if mask_history and mask_tool_schema and i > 0:
            state = masked(state, state_kind, trs[i - 1])
        target = t.next_observation
        raw = None
        if mask_tool_schema and t.next_kind == "tool_response":
            m = mask_tool_response(target, t.info.get("tool_messages"))
            if m != target:
                target, raw = m, target
        out.append(Triplet(
            id=f"{eid}:{t.step}", env=env, kind=t.next_kind, task=task, history=tuple(hist), state=state,
            state_kind=state_kind, action=t.action, next_state=target, valid=bool(t.valid), episode_id=eid,
            step=t.step, task_id=t.task.task_id, task_split=t.task.split, context=ctx, raw_next_state=raw))
    return out


def _alfworld_task(observation: str) -> str:
    prefix = "Your task is to: "
    i = observation.rfind(prefix)
    return observation[i + len(prefix):].strip() if i >= 0 else ""


def _context_of(traj: Trajectory) -> tuple[str, dict[str, Any]]:
    info = traj.reset_info
    if traj.env == "alfworld":
        return str(info.get("task", "")) or _alfworld_task(traj.first_observation), {}
    ctx = {k: info[k] for k in ("domain", "user_known_info", "greeting", "tool_signatures") if k in info}
    if "domain" not in ctx:
        ctx["domain"] = dict(traj.task.options).get("domain", "")
    return "", ctx


def task_status(traj: Trajectory, step: int) -> str:
    """The task's status after turn `step` (the authors' scripts' wording): "successfully completed" /
    "failed" after the last turn of a won / lost episode that ended by the environment's rule, else
    "not yet completed"."""
    if step == len(traj.turns) - 1 and traj.done and not traj.error:
        return "successfully completed" if traj.success else "failed"
    return "not yet completed"


def build_triplets(trajectories: Iterable[Trajectory], *, history_length: int = 2, drop_invalid: bool = False,
                   mask_tool_schema: bool = True, mask_history: bool = False,
                   ask_task_status: bool = False) -> list[Triplet]:
    """Triplets of every turn of every trajectory, in trajectory order (see module docstring).
    ask_task_status: τ² triplets carry ``context["task_status"]`` (`task_status`), and their world-model
    prompt asks for a final status line (the authors' scripts' variant; `rewards.status_penalty` scores it)."""
    out: list[Triplet] = []
    seen: set[str] = set()
    for traj in trajectories:
        if traj.episode_id in seen:
            raise ValueError(f"episode {traj.episode_id!r} appears twice among the trajectories")
        seen.add(traj.episode_id)
        task, ctx = _context_of(traj)
        trips = triplets_from_episode(traj.transitions, history_length=history_length, task=task, context=ctx,
                                      mask_tool_schema=mask_tool_schema, mask_history=mask_history,
                                      drop_invalid=drop_invalid)
        if ask_task_status and traj.env == "tau2":
            trips = [dataclasses.replace(t, context={**t.context, "task_status": task_status(traj, t.step)})
                     for t in trips]
        out += trips
    return out


def _rng(seed: int, salt: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{salt}:{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def assign_split(triplets: Sequence[Triplet], val_fraction: float = 0.1, seed: int = 0,
                 by: SplitBy = "task") -> dict[str, str]:
    """Triplet id -> "train" | "val" (rules in the module docstring). Deterministic in (ids, seed)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if by not in SPLIT_BY:
        raise ValueError(f"split by {by!r} is not supported; choose one of {SPLIT_BY}")
    ids = [t.id for t in triplets]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"triplet id {dup!r} occurs more than once")
    target = round(val_fraction * len(ids))
    val: set[str] = set()
    if by == "triplet":
        order = sorted(ids)
        perm = _rng(seed, "triplet-split").permutation(len(order))
        val = {order[i] for i in perm[:target]}
    else:
        groups: dict[str, list[str]] = {}
        for t in triplets:
            groups.setdefault(t.task_key, []).append(t.id)
        keys = sorted(groups)
        perm = _rng(seed, "task-split").permutation(len(keys))
        for i in perm:
            if len(val) >= target:
                break
            val.update(groups[keys[i]])
    return {i: ("val" if i in val else "train") for i in ids}


def split_triplets(triplets: Sequence[Triplet], val_fraction: float = 0.1, seed: int = 0,
                   by: SplitBy = "task") -> tuple[list[Triplet], list[Triplet]]:
    """(train, val) lists, each in input order."""
    side = assign_split(triplets, val_fraction, seed, by)
    return [t for t in triplets if side[t.id] == "train"], [t for t in triplets if side[t.id] == "val"]


def triplet_stats(triplets: Sequence[Triplet]) -> dict[str, Any]:
    """Counts for the stage summary: total, valid, per kind, per env, masked tool responses."""
    kinds: dict[str, int] = {}
    envs: dict[str, int] = {}
    for t in triplets:
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
        envs[t.env] = envs.get(t.env, 0) + 1
    return {"triplets": len(triplets), "valid": sum(t.valid for t in triplets), "by_kind": kinds,
            "by_env": envs, "masked": sum(t.raw_next_state is not None for t in triplets)}


def dumps_triplet(t: Triplet) -> str:
    """One JSON line."""
    return json.dumps(t.to_dict(), ensure_ascii=False)


def loads_triplet(line: str) -> Triplet:
    return Triplet.from_dict(json.loads(line))
