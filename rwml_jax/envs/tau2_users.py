"""Pluggable τ² user simulators.

A *user factory* makes one fresh τ² user (`tau2.user.base.BaseUser`) per episode: ``make(task, environment)``.
Factories are small picklable dataclasses, so a worker process can build its own users.

* `LiteLLMUser(model, llm_args)`: τ²'s own `UserSimulator` driven by any litellm model — the official setting
  (τ² default: ``gpt-4.1`` at temperature 0). Needs the network / an API key, nothing else does.
* `LocalModelUser(generate_fn)`: the same τ² user prompt (τ²'s simulation guidelines + the task's scenario,
  tools for telecom) sent to a local callable ``generate_fn(messages: list[dict]) -> str`` taking OpenAI-style
  chat messages (the project's own sampler plugs in here). If ``generate_fn`` also accepts a ``tools``
  keyword it receives the user tools' OpenAI schemas; otherwise the tools and the call format are appended to
  the system message. The reply is parsed like an agent turn (`tau2_parse`): ``<tool_call>`` blocks are
  user-side tool calls (telecom device actions), anything else is the user's message.
* `ScriptedUser(turns)`: a list of user turns (or a ``task id -> turns`` mapping, or a function of the
  conversation ``fn(messages) -> str``), one per user generation, parsed the same way; once the list runs
  out the user says ``###STOP###``. For tests and gold replay.

There is no implicit default: an adapter without a user factory refuses to start, so nothing ever reaches
for the network unless `LiteLLMUser` is asked for.

`make_user(spec, endpoint)` is the one factory every stage uses (collect, eval, policy RL), from a config
string: ``litellm:<model>`` (τ²'s own simulator, any litellm provider, key from the environment),
``local:<hf folder or preset>`` (a model served by this project's sampler in the main process through
`rwml_jax.envs.user_server`; `endpoint` is that server's), ``scripted:<file>`` (a JSON list of turns or a
``{task id: [turns]}`` mapping) or ``scripted`` (the user side of the task's gold conversation, offline).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from rwml_jax.envs._tau2_setup import prepare_tau2_import

prepare_tau2_import()

from tau2.data_model.message import MultiToolMessage, ToolCall, UserMessage  # noqa: E402
from tau2.data_model.tasks import Task  # noqa: E402
from tau2.environment.environment import Environment  # noqa: E402
from tau2.environment.tool import Tool  # noqa: E402
from tau2.user.base import STOP, BaseUser, UserError, UserState, ValidUserInputMessage  # noqa: E402
from tau2.user.user_simulator import UserSimulator  # noqa: E402
from tau2.utils.llm_utils import to_litellm_messages  # noqa: E402

from rwml_jax.envs.tau2_gold import gold_script  # noqa: E402
from rwml_jax.envs.tau2_parse import format_tools_prompt, parse_turn  # noqa: E402
from rwml_jax.envs.user_server import RemoteGenerate  # noqa: E402
from rwml_jax.envs.user_spec import parse_user_spec  # noqa: E402

GenerateFn = Callable[..., str]


class UserFactory(Protocol):
    """Makes the user simulator of one episode."""

    def make(self, task: Task, environment: Environment) -> BaseUser: ...


def user_tools_of(environment: Environment) -> list[Tool] | None:
    """The user-side tools of a domain (telecom's device actions) or None, as τ²'s `run_task` does."""
    if environment.user_tools is None:
        return None
    tools = environment.get_user_tools()
    return tools or None


def text_to_user_message(text: str, call_id_prefix: str) -> UserMessage:
    """Parse a generated user turn into a τ² `UserMessage` (tool calls get ``requestor="user"``).

    Well-formed ``<tool_call>`` blocks become user tool calls (τ² executes them; unknown tools or bad arguments
    come back as τ²'s error tool message, which the user sees). Malformed blocks are dropped. A turn with no
    usable call and no text raises `UserError` (τ²'s orchestrator ends the episode with ``user_error``).
    """
    parsed = parse_turn(text)
    calls = [c for c in parsed.calls if c.ok]
    if calls:
        return UserMessage(
            role="user",
            content=None,
            tool_calls=[
                ToolCall(id=f"{call_id_prefix}_{i}", name=c.name, arguments=c.arguments, requestor="user")
                for i, c in enumerate(calls)
            ],
            raw_data={"text": text},
        )
    if not parsed.content:
        raise UserError(f"user simulator produced no message and no usable tool call: {text[:200]!r}")
    return UserMessage(role="user", content=parsed.content, raw_data={"text": text})


class CallableUserSimulator(UserSimulator):
    """τ²'s `UserSimulator` (same system prompt, same role flipping) with the LLM call replaced by a callable.

    respond(messages) -> str gets the OpenAI-style messages τ² would send to litellm: the system prompt,
    then the conversation from the user's side (the agent's messages as ``user``, the simulated user's own
    turns as ``assistant``, its tool results as ``tool``).
    """

    def __init__(
        self,
        respond: Callable[[list[dict[str, Any]]], str],
        tools: list[Tool] | None,
        instructions: str,
        tools_in_prompt: bool,
    ):
        super().__init__(tools=tools, instructions=instructions, llm=None, llm_args=None)
        self._respond = respond
        self._tools_in_prompt = tools_in_prompt
        self._n_turns = 0
        self.seed: int | None = None

    @property
    def system_prompt(self) -> str:
        prompt = super().system_prompt
        if self._tools_in_prompt and self.tools:
            prompt = prompt + "\n\n" + format_tools_prompt([t.openai_schema for t in self.tools])
        return prompt

    @property
    def tool_schemas(self) -> list[dict[str, Any]] | None:
        return [t.openai_schema for t in self.tools] if self.tools else None

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def _generate_next_message(self, message: ValidUserInputMessage, state: UserState) -> tuple[UserMessage, UserState]:
        if isinstance(message, MultiToolMessage):
            state.messages.extend(message.tool_messages)
        else:
            state.messages.append(message)
        messages = to_litellm_messages(state.system_messages + state.flip_roles())
        text = self._respond(messages)
        if not isinstance(text, str):
            raise UserError(f"user generate function returned {type(text).__name__}, expected str")
        self._n_turns += 1
        user_message = text_to_user_message(text, call_id_prefix=f"user_call_{self._n_turns}")
        state.messages.append(user_message)
        return user_message, state


@dataclasses.dataclass
class LiteLLMUser:
    """τ²'s official LLM user simulator through litellm (network). model: any litellm model name."""

    model: str = "gpt-4.1"
    llm_args: dict[str, Any] = dataclasses.field(default_factory=lambda: {"temperature": 0.0})

    def make(self, task: Task, environment: Environment) -> BaseUser:
        return UserSimulator(
            tools=user_tools_of(environment),
            instructions=str(task.user_scenario),
            llm=self.model,
            llm_args=dict(self.llm_args),
        )


def _accepts_tools_kwarg(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "tools" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@dataclasses.dataclass
class LocalModelUser:
    """A local model as the user: ``generate_fn(messages[, tools=...]) -> str`` (no network)."""

    generate_fn: GenerateFn

    def make(self, task: Task, environment: Environment) -> BaseUser:
        tools = user_tools_of(environment)
        with_tools = _accepts_tools_kwarg(self.generate_fn)
        schemas = [t.openai_schema for t in tools] if tools else None

        def respond(messages: list[dict[str, Any]]) -> str:
            if with_tools:
                return self.generate_fn(messages, tools=schemas)
            return self.generate_fn(messages)

        return CallableUserSimulator(respond, tools, str(task.user_scenario), tools_in_prompt=not with_tools)


Script = Sequence[str] | Callable[[list[dict[str, Any]]], str]


@dataclasses.dataclass
class ScriptedUser:
    """Scripted user turns (tests, gold replay); after the last turn the user says ``###STOP###``.

    turns: a list of turns, a mapping task id -> list of turns, or ``fn(messages) -> str``.
    """

    turns: Script | Mapping[str, Sequence[str]]

    def make(self, task: Task, environment: Environment) -> BaseUser:
        script: Any = self.turns
        if isinstance(script, Mapping):
            if task.id not in script:
                raise ValueError(f"ScriptedUser has no turns for task {task.id!r}")
            script = script[task.id]
        if callable(script):
            respond = script
        else:
            remaining = list(script)

            def respond(messages: list[dict[str, Any]]) -> str:
                return remaining.pop(0) if remaining else STOP

        return CallableUserSimulator(respond, user_tools_of(environment), str(task.user_scenario), tools_in_prompt=True)


class GoldScriptUser:
    """τ² user factory: the user turns of the task's gold conversation (offline, deterministic)."""

    def make(self, task: Task, environment: Environment) -> BaseUser:
        return ScriptedUser(gold_script(task)[1]).make(task, environment)


def make_user(spec: str, endpoint: Any = None, *, temperature: float = 0.0) -> UserFactory:
    """The user factory a spec names. endpoint: the `GenerationServer` endpoint serving a ``local:`` model
    (`rwml_jax.train.user_sim.serve_users` starts it). temperature: the litellm user's sampling temperature."""
    kind, arg = parse_user_spec(spec)
    if kind == "litellm":
        return LiteLLMUser(model=arg, llm_args={"temperature": temperature})
    if kind == "local":
        if endpoint is None:
            raise ValueError(f"user simulator {spec!r} is served by the main process, but no server endpoint was "
                             "given (start it with rwml_jax.train.user_sim.serve_users)")
        return LocalModelUser(RemoteGenerate(tuple(endpoint)))
    if not arg:
        return GoldScriptUser()
    with open(arg) as f:
        turns = json.load(f)
    if not isinstance(turns, (list, dict)):
        raise ValueError(f"scripted user file {arg!r} must hold a JSON list of turns or {{task id: [turns]}}")
    return ScriptedUser(turns)
