"""Parse the text a policy generates for one τ² turn into a message or tool calls.

The agent turn format (Hermes / Qwen2.5 / Qwen3 style, what their chat templates teach the model):

* Reasoning in ``<think>…</think>`` is removed first. Everything up to and including the *last*
  ``</think>`` is dropped, so a Qwen3 completion whose ``<think>`` opener sits in the prompt works too.
* Tool calls are one or more blocks ``<tool_call>{"name": "get_user_details", "arguments": {"user_id":
  "sara_doe_496"}}</tool_call>``. ``arguments`` must be a JSON object (an OpenAI-style JSON-encoded string
  holding an object is accepted too); a missing ``arguments`` means ``{}``. An unclosed trailing
  ``<tool_call>`` (generation cut off) is a malformed block.
* A turn with at least one block is a tool-call turn: τ² forbids text and tool calls in one message, so text
  outside the blocks is not sent to anyone (it is kept in ``ParsedTurn.content``).
* Any other text is a message to the user (τ² then runs the user simulator).

Only the *syntax* is checked here (valid JSON, a string ``name``, an object ``arguments``). Whether the tool
exists and accepts the arguments is decided by τ² itself when the call executes, so those errors carry τ²'s
own wording (``Error: Tool 'x' not found.``, ``Error: f() missing 1 required positional argument …``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
THINK_CLOSE = "</think>"

_BLOCK_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ParsedCall:
    """One ``<tool_call>`` block. ``error`` is set (and name/arguments may be None) when it is malformed."""

    raw: str
    name: str | None
    arguments: dict[str, Any] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """An agent (or scripted/local user) turn after parsing.

    content: the visible text with reasoning and tool-call blocks removed, stripped.
    calls: the tool-call blocks in order (empty for a message turn).
    """

    content: str
    calls: tuple[ParsedCall, ...]

    @property
    def is_tool_call(self) -> bool:
        return len(self.calls) > 0

    @property
    def is_empty(self) -> bool:
        return not self.calls and not self.content


def strip_reasoning(text: str) -> str:
    """Drop everything up to and including the last ``</think>``; drop an unclosed ``<think>`` tail."""
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1]
    elif "<think>" in text:  # reasoning never closed: nothing after it was meant for anyone
        text = text.split("<think>", 1)[0]
    return text


def _parse_block(raw: str, closed: bool) -> ParsedCall:
    if not closed:
        return ParsedCall(raw, None, None, "Error: unterminated <tool_call> block (missing </tool_call>)")
    body = raw.strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ParsedCall(raw, None, None, f"Error: tool call is not valid JSON: {e}")
    if not isinstance(obj, dict):
        return ParsedCall(raw, None, None, 'Error: tool call must be a JSON object {"name": ..., "arguments": {...}}')
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return ParsedCall(raw, None, None, 'Error: tool call has no "name" string')
    args = obj.get("arguments", {})
    if isinstance(args, str):  # OpenAI-style JSON-encoded arguments
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return ParsedCall(raw, name, None, f"Error: arguments of tool call '{name}' are not valid JSON: {e}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return ParsedCall(raw, name, None, f"Error: arguments of tool call '{name}' must be a JSON object")
    return ParsedCall(raw, name.strip(), args, None)


def parse_turn(text: str) -> ParsedTurn:
    """Parse one generated turn (see module docstring for the format)."""
    visible = strip_reasoning(text)
    calls: list[ParsedCall] = []
    pieces: list[str] = []
    pos = 0
    for m in _BLOCK_RE.finditer(visible):
        pieces.append(visible[pos : m.start()])
        closed = m.group(0).endswith(TOOL_CALL_CLOSE)
        calls.append(_parse_block(m.group(1), closed))
        pos = m.end()
    pieces.append(visible[pos:])
    content = "".join(pieces).strip()
    return ParsedTurn(content=content, calls=tuple(calls))


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The inverse of `parse_turn` for one call: the text a policy should emit to call ``name``."""
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{TOOL_CALL_CLOSE}"


def format_tools_prompt(tools: list[dict[str, Any]]) -> str:
    """A system-prompt section listing ``tools`` (OpenAI function schemas) and the call format above.

    Mirrors the Hermes/Qwen chat-template tool section, for models driven through a plain
    ``generate_fn(messages)`` that does not take a ``tools`` argument.
    """
    lines = [
        "# Tools",
        "",
        "You may call one or more functions to assist with the user query.",
        "",
        "You are provided with function signatures within <tools></tools> XML tags:",
        "<tools>",
        *[json.dumps(t) for t in tools],
        "</tools>",
        "",
        (
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:"
        ),
        "<tool_call>",
        '{"name": <function-name>, "arguments": <args-json-object>}',
        "</tool_call>",
    ]
    return "\n".join(lines)
