"""Multi-turn batched rollout: the policy plays N episodes of every task through an `EnvPool`.

    result = rollout(pool, tasks, generate_fn, trajectories_per_task=3, history_length=2,
                     provenance={"model": ..., "config_hash": ..., "seed": ...})
    result.trajectories   # list[Trajectory], ordered by (task, sample_index)
    result.stats          # RolloutStats: success rate, invalid / format-error rates, timings

Scheduling (verl-agent's loop, with continuous refill): the N episodes of a task are started with the *same*
TaskSpec (same reset seed, so a group sees the same game / user), and fill the pool's slots in task order.
Each turn, the prompts of *all* live episodes are built and passed to ``generate_fn`` in one call (the sampler
batches them), each output is parsed into an action (`rwml_jax.agent.parse`), and the pool steps every live
environment concurrently. An episode that ends (done, truncated, worker crash, or ``max_turns`` reached) frees
its slot, which the next pending episode takes at the start of the following turn.

``generate_fn(prompts) -> list`` receives one prompt per live episode, in slot order — chat messages
(``prompt_format="chat"``, the sampler applies the chat template) or strings rendered by
`rwml_jax.agent.prompts.render_plain` (``prompt_format="text"``) — and returns one result per prompt: a
`str`, or an object / dict with ``text`` (a `GenerationResult` of the sampler) and optionally ``tokens`` /
``token_ids`` / ``num_tokens``, and for training ``prompt_ids`` and ``logprobs`` (kept in the `Turn`
with ``token_ids``, see `Generation`). It owns its RNG stream (seed it from the config; the rollout calls it once per
turn in a deterministic order). Tests pass a deterministic policy function; the collect stage passes the
jitted sampler.

The rollout writes nothing: it returns data; the collect stage writes it with its provenance.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from rwml_jax.agent.parse import ParsedAction, parse_alfworld_action, tau2_agent_action
from rwml_jax.agent.prompts import (
    Message,
    alfworld_policy_messages,
    render_plain,
    strip_banner,
    tau2_policy_messages,
    tool_signature,
)
from rwml_jax.agent.trajectory import Trajectory, Turn
from rwml_jax.envs.base import StepResult, TaskSpec
from rwml_jax.envs.recorder import TransitionRecorder

Prompt = list[Message] | str
GenerateFn = Callable[[list[Prompt]], Sequence[Any]]
TASK_PREFIX = "Your task is to: "


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generated continuation, as the rollout needs it. prompt_ids / token_ids / logprobs: the
    prompt's token ids, the sampled ids and their log-probs under the sampling policy, when the
    generator reports them (policy RL trains on them)."""

    text: str
    num_tokens: int | None = None
    truncated: bool = False  # cut at the token budget (no end-of-turn token)
    prompt_ids: list[int] | None = None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


def as_generation(x: Any) -> Generation:
    """Accept a str, a dict or an object with ``text`` (+ optional token ids / count) from a generate_fn."""
    if isinstance(x, str):
        return Generation(x)
    get = x.get if isinstance(x, Mapping) else (lambda k, d=None: getattr(x, k, d))
    text = get("text")
    if not isinstance(text, str):
        raise TypeError(f"generate_fn must return str or objects with a str `text`; got {type(x).__name__} "
                        f"with text={type(text).__name__}")
    n = get("num_tokens")
    ids = get("token_ids")
    if n is None:
        toks = get("tokens")
        toks = ids if toks is None else toks
        n = len(toks) if toks is not None else None
    prompt_ids, logprobs = get("prompt_ids"), get("logprobs")
    return Generation(text, None if n is None else int(n), bool(get("truncated") or False),
                      prompt_ids=None if prompt_ids is None else [int(i) for i in prompt_ids],
                      token_ids=None if ids is None else [int(i) for i in ids],
                      logprobs=None if logprobs is None else [float(x) for x in logprobs])


class _Episode(Protocol):
    def prompt(self) -> list[Message]: ...

    def parse(self, text: str) -> ParsedAction: ...

    def observe(self, action: str, result: StepResult) -> None: ...

    def reset_info(self) -> dict[str, Any]: ...


class AlfworldEpisode:
    """Prompt state of one ALFWorld episode: task, current observation, admissible commands, history."""

    def __init__(self, first: StepResult, history_length: int) -> None:
        info = first.info
        obs = first.observation
        self.task = info.get("task") or (obs[obs.rfind(TASK_PREFIX) + len(TASK_PREFIX):].strip()
                                         if TASK_PREFIX in obs else "")
        if not self.task:
            raise ValueError("ALFWorld reset gave no task: expected info['task'] or 'Your task is to: …' in "
                             f"the first observation, got {obs[:200]!r}")
        self.history_length = history_length
        self.observation = strip_banner(obs)
        self.admissible = list(info.get("admissible_commands", []))
        self.history: list[tuple[str, str]] = []
        self._info = {k: info[k] for k in ("task", "task_type", "task_id", "gamefile", "max_steps") if k in info}
        self._info.setdefault("task", self.task)

    def prompt(self) -> list[Message]:
        return alfworld_policy_messages(self.task, self.observation, self.admissible, self.history,
                                        history_length=self.history_length)

    def parse(self, text: str) -> ParsedAction:
        return parse_alfworld_action(text, self.admissible)

    def observe(self, action: str, result: StepResult) -> None:
        self.history.append((self.observation, action))
        self.observation = result.observation
        self.admissible = list(result.info.get("admissible_commands", []))

    def reset_info(self) -> dict[str, Any]:
        return dict(self._info)


class Tau2Episode:
    """Prompt state of one τ² episode: τ²'s system prompt, the tools and the conversation so far."""

    def __init__(self, first: StepResult) -> None:
        info = first.info
        missing = [k for k in ("system_prompt", "tools", "greeting") if k not in info]
        if missing:
            raise ValueError(f"τ² reset info lacks {missing}: the rollout needs the adapter's system_prompt, "
                             f"tools and greeting (rwml_jax.envs.tau2_env.Tau2Env)")
        self.system_prompt = info["system_prompt"]
        self.tools = list(info["tools"])
        self.conversation: list[Message] = [{"role": "assistant", "content": info["greeting"]},
                                            {"role": "user", "content": first.observation}]
        self._info = {k: info[k] for k in ("domain", "task_id", "split", "greeting", "user_known_info", "user")
                      if k in info}
        self._info["tool_signatures"] = [tool_signature(t) for t in self.tools]

    def prompt(self) -> list[Message]:
        return tau2_policy_messages(self.system_prompt, self.tools, self.conversation)

    def parse(self, text: str) -> ParsedAction:
        return tau2_agent_action(text)

    def observe(self, action: str, result: StepResult) -> None:
        self.conversation.append({"role": "assistant", "content": action})
        if result.next_kind == "tool_response":
            calls = result.info.get("tool_messages") or [{"name": None, "content": result.observation}]
            for c in calls:
                self.conversation.append({"role": "tool", "name": c.get("name"), "content": c.get("content")})
        else:  # the user's reply, or τ²'s format-error text for an empty turn (shown as the next user turn)
            self.conversation.append({"role": "user", "content": result.observation})

    def reset_info(self) -> dict[str, Any]:
        return dict(self._info)


def make_episode(task: TaskSpec, first: StepResult, history_length: int) -> _Episode:
    if task.env == "alfworld":
        return AlfworldEpisode(first, history_length)
    if task.env == "tau2":
        return Tau2Episode(first)
    raise ValueError(f"no policy prompt format for env {task.env!r}; known: 'alfworld', 'tau2'")


@dataclasses.dataclass
class RolloutStats:
    """Totals over one rollout call. Rates are per step (invalid, format errors) or per episode (success)."""

    episodes: int = 0
    successes: int = 0
    steps: int = 0
    invalid_steps: int = 0
    format_errors: int = 0
    truncated: int = 0
    crashed: int = 0
    generate_calls: int = 0
    output_tokens: int = 0
    truncated_outputs: int = 0  # policy outputs cut at the token budget (max_new_tokens)
    generate_seconds: float = 0.0
    env_seconds: float = 0.0

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    @property
    def invalid_rate(self) -> float:
        return self.invalid_steps / self.steps if self.steps else 0.0

    @property
    def format_error_rate(self) -> float:
        return self.format_errors / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = dataclasses.asdict(self)
        d.update(success_rate=self.success_rate, invalid_rate=self.invalid_rate,
                 format_error_rate=self.format_error_rate)
        return d


@dataclasses.dataclass(frozen=True)
class TurnContext:
    """What a non-model policy may know about a live episode (``rollout(..., with_context=True)``).

    task: the episode's TaskSpec. step: turns taken so far. reset_info: the episode's reset info (ALFWorld:
    task, task type, task id, gamefile; τ²: domain, task id, tool signatures). admissible: the ALFWorld
    commands admissible now (empty for τ²). tools: τ²'s OpenAI tool schemas (empty for ALFWorld).
    """

    task: TaskSpec
    step: int
    reset_info: dict[str, Any]
    admissible: tuple[str, ...] = ()
    tools: tuple[dict[str, Any], ...] = ()


def _context(lv: _Live) -> TurnContext:
    ep = lv.episode
    return TurnContext(task=lv.task, step=len(lv.turns), reset_info=ep.reset_info(),
                       admissible=tuple(getattr(ep, "admissible", ())), tools=tuple(getattr(ep, "tools", ())))


@dataclasses.dataclass
class RolloutResult:
    trajectories: list[Trajectory]
    stats: RolloutStats


@dataclasses.dataclass
class _Live:
    order: int
    task: TaskSpec
    sample_index: int
    episode: _Episode
    first_observation: str
    turns: list[Turn]


class _Pool(Protocol):  # what rollout needs of rwml_jax.envs.pool.EnvPool
    num_envs: int

    def reset(self, tasks: Sequence[TaskSpec | None]) -> list[StepResult | None]: ...

    def step(self, actions: Sequence[str | None]) -> list[StepResult | None]: ...


def _is_success(result: StepResult) -> bool:
    return bool(result.done and not result.truncated and result.reward >= 1.0 - 1e-6)


def rollout(pool: _Pool, tasks: Sequence[TaskSpec], generate_fn: GenerateFn, *,
            trajectories_per_task: int = 1, history_length: int = 2, max_turns: int | None = None,
            prompt_format: Literal["chat", "text"] = "chat", record_prompts: bool = True,
            provenance: Mapping[str, Any] | None = None,
            on_turn: Callable[[RolloutStats, int], None] | None = None,
            on_episode: Callable[[int, Trajectory], None] | None = None,
            with_context: bool = False,
            sample_task: Callable[[TaskSpec, int], TaskSpec] | None = None) -> RolloutResult:
    """Play ``trajectories_per_task`` episodes of every task with the policy behind ``generate_fn``.

    Args:
      pool: an `EnvPool` (or anything with its reset/step batch API) whose envs serve the tasks' env.
      tasks: the tasks; each is played N times with the same TaskSpec (shared reset seed).
      generate_fn: one call per turn with the prompts of all live episodes (see module docstring).
      trajectories_per_task: N.
      history_length: (observation, action) pairs in the ALFWorld prompt (τ² prompts hold the conversation).
      max_turns: the rollout's own turn limit per episode (None: rely on the environment's step limit);
        an episode cut by it is truncated.
      prompt_format: "chat" (messages) or "text" (`render_plain` strings) for generate_fn.
      record_prompts: keep each turn's prompt in the trajectory (τ² prompts are long).
      provenance: model, config hash, seed, … stored in every trajectory.
      on_turn: called after every turn with the running stats and the number of live episodes.
      on_episode: called with (position in the returned list, trajectory) as soon as an episode ends
        (callers that persist episodes one by one, e.g. a resumable evaluation).
      with_context: call ``generate_fn(prompts, contexts)`` with one `TurnContext` per prompt (reference
        policies: an expert replaying a walkthrough, a random admissible action).
      sample_task: ``(task, k) -> TaskSpec`` the k-th episode of a task is reset with (and recorded under);
        e.g. τ²'s user-simulator mix sets an option on some of the N samples. None: the task itself.

    Returns the trajectories ordered by (task index, sample_index) — independent of scheduling — and stats.
    """
    if trajectories_per_task < 1:
        raise ValueError(f"trajectories_per_task must be >= 1, got {trajectories_per_task}")
    if history_length < 0:
        raise ValueError(f"history_length must be >= 0, got {history_length}")
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be >= 1 or None, got {max_turns}")
    if prompt_format not in ("chat", "text"):
        raise ValueError(f"prompt_format must be 'chat' or 'text', got {prompt_format!r}")
    for i, t in enumerate(tasks):
        if not isinstance(t, TaskSpec):
            raise TypeError(f"tasks[{i}] must be a TaskSpec, got {type(t).__name__}")
    prov = dict(provenance or {})
    prov.update(history_length=history_length, trajectories_per_task=trajectories_per_task,
                max_turns=max_turns, prompt_format=prompt_format)

    pending = collections.deque((ti * trajectories_per_task + k, sample_task(task, k) if sample_task else task, k)
                                for ti, task in enumerate(tasks) for k in range(trajectories_per_task))
    live: dict[int, _Live] = {}
    done: dict[int, Trajectory] = {}
    recorder = TransitionRecorder()
    stats = RolloutStats()
    n = pool.num_envs

    def finish(slot: int, result: StepResult, cut_by_rollout: bool = False) -> None:
        lv = live.pop(slot)
        error = result.info.get("error")
        truncated = bool(result.truncated or cut_by_rollout)
        episode_id = result.info.get("episode_id") or (lv.turns[0].transition.episode_id if lv.turns else "")
        traj = Trajectory(
            episode_id=str(episode_id), task=lv.task, sample_index=lv.sample_index,
            first_observation=lv.first_observation, reset_info=lv.episode.reset_info(), turns=lv.turns,
            success=_is_success(result) and not cut_by_rollout, reward=float(result.reward),
            done=bool(result.done), truncated=truncated, error=str(error) if error else None, provenance=prov)
        done[lv.order] = traj
        if on_episode is not None:
            on_episode(lv.order, traj)
        stats.episodes += 1
        stats.successes += traj.success
        stats.truncated += traj.truncated
        stats.crashed += traj.error is not None

    def next_tasks() -> list[TaskSpec]:  # what the pool may preload: the tasks that start next
        return [t for _, t, _ in itertools.islice(pending, n)]

    while pending or live:
        free = [s for s in range(n) if s not in live]
        starts: list[TaskSpec | None] = [None] * n
        started: dict[int, tuple[int, TaskSpec, int]] = {}
        for s in free:
            if not pending:
                break
            order, task, k = pending.popleft()
            starts[s] = task
            started[s] = (order, task, k)
        if started:
            t0 = time.perf_counter()
            firsts = pool.reset(starts, upcoming=next_tasks())
            stats.env_seconds += time.perf_counter() - t0
            recorder.on_reset(starts, firsts)
            for s, (order, task, k) in started.items():
                first = firsts[s]
                assert first is not None
                live[s] = _Live(order=order, task=task, sample_index=k,
                                episode=_EndedAtReset(first) if (first.done or first.truncated)
                                else make_episode(task, first, history_length),
                                first_observation=first.observation, turns=[])
                if first.done or first.truncated:  # could not start (crash during reset, broken game)
                    if not first.info.get("error") and not first.done:
                        first.info["error"] = "episode was truncated at reset"
                    finish(s, first)
        if not live:
            continue

        slots = sorted(live)
        prompts_msgs = [live[s].episode.prompt() for s in slots]
        prompts: list[Prompt] = (prompts_msgs if prompt_format == "chat"
                                 else [render_plain(p) for p in prompts_msgs])
        t0 = time.perf_counter()
        outputs = list(generate_fn(prompts, [_context(live[s]) for s in slots]) if with_context
                       else generate_fn(prompts))
        stats.generate_seconds += time.perf_counter() - t0
        stats.generate_calls += 1
        if len(outputs) != len(prompts):
            raise ValueError(f"generate_fn returned {len(outputs)} results for {len(prompts)} prompts")
        gens = [as_generation(o) for o in outputs]

        actions: list[str | None] = [None] * n
        parsed: dict[int, ParsedAction] = {}
        for s, g in zip(slots, gens):
            parsed[s] = live[s].episode.parse(g.text)
            actions[s] = parsed[s].action
        t0 = time.perf_counter()
        results = pool.step(actions, upcoming=next_tasks())
        stats.env_seconds += time.perf_counter() - t0
        transitions = recorder.on_step(actions, results)
        by_slot = dict(zip([s for s in range(n) if actions[s] is not None and results[s] is not None],
                           transitions))
        for s, prompt_msgs, g in zip(slots, prompts_msgs, gens):
            res = results[s]
            if res is None:
                raise RuntimeError(f"env pool returned no result for stepped slot {s}")
            lv, pa, tr = live[s], parsed[s], by_slot[s]
            lv.turns.append(Turn(step=len(lv.turns), prompt=prompt_msgs if record_prompts else None,
                                 output=g.text, action=pa.action, format_ok=pa.format_ok,
                                 has_think=pa.has_think, format_error=pa.error, transition=tr,
                                  output_tokens=g.num_tokens, truncated=g.truncated, prompt_ids=g.prompt_ids,
                                  completion_ids=g.token_ids, logprobs=g.logprobs))
            stats.steps += 1
            stats.invalid_steps += not tr.valid
            stats.format_errors += not pa.format_ok
            stats.output_tokens += g.num_tokens or 0
            stats.truncated_outputs += g.truncated
            if res.done or res.truncated:
                finish(s, res)
            elif max_turns is not None and len(lv.turns) >= max_turns:
                finish(s, res, cut_by_rollout=True)
            else:
                lv.episode.observe(pa.action, res)
        if on_turn is not None:
            on_turn(stats, len(live))

    return RolloutResult([done[i] for i in sorted(done)], stats)


class _EndedAtReset:
    """Episode stand-in for an episode that ended at reset (never prompted)."""

    def __init__(self, first: StepResult) -> None:
        self._info = {k: v for k, v in first.info.items() if k in ("task", "task_type", "task_id", "error", "user")}

    def prompt(self) -> list[Message]:  # pragma: no cover - never called
        raise RuntimeError("episode ended at reset")

    def parse(self, text: str) -> ParsedAction:  # pragma: no cover
        raise RuntimeError("episode ended at reset")

    def observe(self, action: str, result: StepResult) -> None:  # pragma: no cover
        raise RuntimeError("episode ended at reset")

    def reset_info(self) -> dict[str, Any]:
        return dict(self._info)
