"""Policy prompts: the ReAct prompt for ALFWorld and the tool-calling prompt for τ²-Bench.

Prompts are chat messages (``[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]``) so the
sampler's chat helper applies the model's own chat template; `render_plain` turns them into one string for
tokenizers without a chat template (the CPU demo's tokenizer).

ALFWorld (verl-agent / GiGPO style, as the paper follows): each turn is its own single-message prompt with the
task, the last ``history_length`` (observation, action) pairs, the current observation and the admissible
commands, and asks for reasoning in ``<think></think>`` followed by one command in ``<action></action>``
(parsed by `rwml_jax.agent.parse.parse_alfworld_action`). The first turn (or ``history_length=0``) uses the
variant without a history paragraph.

τ² (the format `rwml_jax.envs.tau2_parse` parses): system = τ²'s own agent system prompt (agent instruction +
domain policy, from the adapter's ``info["system_prompt"]``) + the tool signatures in the Hermes/Qwen
``<tools>`` section + the response format; then the whole conversation so far: the agent's fixed greeting,
user turns as ``user``, the agent's earlier turns (reasoning removed) as ``assistant``, tool results as
``tool`` messages (one per call). The model answers either with a message to the user or with
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rwml_jax.envs.tau2_parse import format_tools_prompt

Message = dict[str, Any]  # {"role": ..., "content": ...} (+ "name" for tool messages)

BANNER = "-= Welcome to TextWorld, ALFRED! =-"

ALFWORLD_TEMPLATE_NO_HISTORY = """\
You are an expert agent operating in the ALFRED Embodied Environment. Your task is to: {task}
Your current observation is: {observation}
Your admissible actions of the current situation are: [{admissible_actions}].

Now it's your turn to take an action.
You should first reason step-by-step about the current situation. This reasoning process MUST be enclosed \
within <think> </think> tags.
Once you've finished your reasoning, you should choose an admissible action for current step and present it \
within <action> </action> tags."""

ALFWORLD_TEMPLATE = """\
You are an expert agent operating in the ALFRED Embodied Environment. Your task is to: {task}
Prior to this step, you have already taken {step_count} step(s). Below are the most recent {history_size} \
observations and the corresponding actions you took:
{history}
You are now at step {current_step} and your current observation is: {observation}
Your admissible actions of the current situation are: [{admissible_actions}].

Now it's your turn to take an action.
You should first reason step-by-step about the current situation. This reasoning process MUST be enclosed \
within <think> </think> tags.
Once you've finished your reasoning, you should choose an admissible action for current step and present it \
within <action> </action> tags."""

TAU2_RESPONSE_FORMAT = """\
# Response format

First reason about the conversation inside <think></think>. Then do exactly one of:
- write your next message to the user as plain text, or
- call one or more tools, each as <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>, \
with no other text.
A single turn cannot both message the user and call tools. When the user's request is fully handled and the \
conversation should end, reply with ###STOP###."""


def strip_banner(observation: str) -> str:
    """Drop ALFWorld's "-= Welcome to TextWorld, ALFRED! =-" line from a first observation."""
    if observation.lstrip().startswith(BANNER):
        return observation.lstrip()[len(BANNER):].lstrip("\n").strip()
    return observation.strip()


def format_admissible(commands: Sequence[str]) -> str:
    """verl-agent's rendering of the admissible commands (one quoted command a line, "help" left out)."""
    return "\n ".join(f"'{c}'" for c in commands if c != "help")


def format_alfworld_history(history: Sequence[tuple[str, str]], first_step: int) -> str:
    """``[Observation k: '...', Action k: '...']`` lines for (observation, action) pairs; k starts at first_step."""
    return "\n".join(f"[Observation {first_step + j}: '{obs.strip()}', Action {first_step + j}: '{act}']"
                     for j, (obs, act) in enumerate(history))


def alfworld_policy_messages(task: str, observation: str, admissible: Sequence[str],
                             history: Sequence[tuple[str, str]], *, history_length: int = 2,
                             step_count: int | None = None) -> list[Message]:
    """The ReAct prompt of one ALFWorld turn, as a single user message.

    task: the task sentence ("put a clean knife in countertop."). observation: the current observation s_t.
    admissible: the admissible commands of s_t. history: all (observation, action) pairs of the episode so
    far, oldest first (only the last ``history_length`` are shown). step_count: steps already taken
    (default len(history)).
    """
    if history_length < 0:
        raise ValueError(f"history_length must be >= 0, got {history_length}")
    steps = len(history) if step_count is None else step_count
    recent = list(history[-history_length:]) if history_length > 0 else []
    obs = strip_banner(observation)
    if not recent:
        text = ALFWORLD_TEMPLATE_NO_HISTORY.format(task=task, observation=obs,
                                                   admissible_actions=format_admissible(admissible))
    else:
        text = ALFWORLD_TEMPLATE.format(
            task=task, step_count=steps, history_size=len(recent),
            history=format_alfworld_history(recent, first_step=steps - len(recent) + 1),
            current_step=steps + 1, observation=obs, admissible_actions=format_admissible(admissible))
    return [{"role": "user", "content": text}]


def tau2_system_prompt(system_prompt: str, tools: Sequence[Mapping[str, Any]]) -> str:
    """τ²'s agent system prompt + the tool signatures + the response format."""
    parts = [system_prompt.strip()]
    if tools:
        parts.append(format_tools_prompt([dict(t) for t in tools]))
    parts.append(TAU2_RESPONSE_FORMAT)
    return "\n\n".join(parts)


def tau2_policy_messages(system_prompt: str, tools: Sequence[Mapping[str, Any]],
                         conversation: Sequence[Message]) -> list[Message]:
    """The prompt of one τ² agent turn: system (policy + tools + format) and the conversation so far.

    conversation: messages with roles "assistant" (the agent's greeting and earlier turns, reasoning
    removed), "user" (the user's replies) and "tool" (one per tool result, with "name").
    """
    for i, m in enumerate(conversation):
        if m.get("role") not in ("user", "assistant", "tool"):
            raise ValueError(f"conversation[{i}] has role {m.get('role')!r}; expected user/assistant/tool")
    return [{"role": "system", "content": tau2_system_prompt(system_prompt, tools)}, *conversation]


_PLAIN_ROLE = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_plain(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Chat messages as plain text ("System: …\\n\\nUser: …\\n\\nAssistant:") for tokenizers without a chat
    template; ``add_generation_prompt`` appends the "Assistant:" line the model continues."""
    blocks = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in _PLAIN_ROLE:
            raise ValueError(f"messages[{i}] has unknown role {role!r}")
        blocks.append(f"{_PLAIN_ROLE[role]}: {m.get('content') or ''}")
    text = "\n\n".join(blocks)
    if add_generation_prompt:
        text += "\n\nAssistant:"
    return text


def tool_signature(schema: Mapping[str, Any]) -> str:
    """A one-line signature of an OpenAI function schema: ``name(arg: type, opt?: type)``."""
    fn = schema.get("function", schema)
    params = fn.get("parameters") or {}
    required = set(params.get("required", ()))
    args = []
    for name, spec in (params.get("properties") or {}).items():
        typ = spec.get("type") or ("|".join(s.get("type", "?") for s in spec.get("anyOf", [])) or "any")
        args.append(f"{name}{'' if name in required else '?'}: {typ}")
    return f"{fn.get('name', '?')}({', '.join(args)})"
