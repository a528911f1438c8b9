"""Turning a policy's generated text into the action an environment is stepped with.

ALFWorld (ReAct format taught by `rwml_jax.agent.prompts`): the model reasons in ``<think>…</think>`` and
gives one command in ``<action>…</action>``. `parse_alfworld_action` applies these rules, in order:

1. The *last* closed ``<action>…</action>`` block wins (tags are case-insensitive; a model that drafts an
   action inside its reasoning and then commits to another gives the committed one). ``format_ok=True``.
2. Tolerant fallback: an unclosed ``<action>`` (generation cut by the token limit, or stopped on the
   ``</action>`` stop string that the sampler strips) — its text up to the end of the line is the action,
   ``format_ok=False`` with reason "unclosed <action> tag". The environment still judges it.
3. No ``<action>`` tag at all: the action is `INVALID_ACTION`, a string no ALFWorld state admits, so the
   engine answers "Nothing happens." and the adapter marks the step invalid. ``format_ok=False``. The step is
   still taken (and counts towards the step limit), as in verl-agent, so a malformed turn costs the agent a
   step and is visible in the trajectory instead of being silently repaired.

The extracted command is normalised the way ALFWorld spells commands: surrounding quotes / backticks and a
trailing period are removed, whitespace is collapsed and the text is lower-cased ("Go to Desk 1." ->
"go to desk 1"; the engine is case-sensitive and would reject the former). When the admissible commands are
given, a command that equals one of them up to case and whitespace is replaced by that exact spelling. There
is no fuzzy or substring matching: a command that is not admissible reaches the engine unchanged and is
rejected there.

``has_think`` records whether a closed ``<think>…</think>`` block preceded the action (verl-agent marks a turn
without one as a format error; here it is reported, not enforced).

τ² (tool-calling format of `rwml_jax.envs.tau2_parse`): the environment parses the turn itself. The action
sent to it is the turn with its reasoning removed (`tau2_agent_action`), so transitions and world-model
triplets carry the visible turn, not the chain of thought; the τ² adapter would drop the reasoning anyway.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from rwml_jax.envs.tau2_parse import parse_turn, strip_reasoning

# Sent to ALFWorld when the output has no <action> tag: not admissible in any state (the engine answers
# "Nothing happens.", the adapter reports valid=False). Kept readable so it is obvious in trajectories.
INVALID_ACTION = "<invalid: no action given>"

_ACTION_BLOCK_RE = re.compile(r"<action>(.*?)</action>", re.IGNORECASE | re.DOTALL)
_ACTION_OPEN_RE = re.compile(r"<action>", re.IGNORECASE)
_THINK_RE = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_WS_RE = re.compile(r"\s+")
_QUOTES = "\"'`“”‘’"


@dataclasses.dataclass(frozen=True)
class ParsedAction:
    """The action extracted from one generated turn.

    action: the text the environment is stepped with.
    format_ok: the output followed the format (a closed action block; for τ², a non-empty turn whose
      tool-call blocks are all well-formed JSON).
    has_think: a closed <think>…</think> block is present.
    error: why the format check failed (None when format_ok).
    """

    action: str
    format_ok: bool
    has_think: bool
    error: str | None = None


def normalize_command(text: str) -> str:
    """ALFWorld spelling of a command: one line, no quotes / trailing period, single spaces, lower case."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    text = text.strip().strip(_QUOTES).strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    return _WS_RE.sub(" ", text).strip().lower()


def _canonical(command: str, admissible: Sequence[str] | None) -> str:
    if not admissible:
        return command
    for cand in admissible:
        if _WS_RE.sub(" ", cand.strip()).lower() == command:
            return cand
    return command


def parse_alfworld_action(text: str, admissible: Sequence[str] | None = None) -> ParsedAction:
    """Extract the ALFWorld command from a ReAct turn (rules in the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"policy output must be a str, got {type(text).__name__}")
    has_think = _THINK_RE.search(text) is not None
    blocks = _ACTION_BLOCK_RE.findall(text)
    if blocks:
        command = normalize_command(blocks[-1])
        if not command:
            return ParsedAction(INVALID_ACTION, False, has_think, "empty <action></action> block")
        return ParsedAction(_canonical(command, admissible), True, has_think)
    opens = list(_ACTION_OPEN_RE.finditer(text))
    if opens:
        command = normalize_command(text[opens[-1].end():])
        if command:
            return ParsedAction(_canonical(command, admissible), False, has_think, "unclosed <action> tag")
        return ParsedAction(INVALID_ACTION, False, has_think, "empty unclosed <action> tag")
    return ParsedAction(INVALID_ACTION, False, has_think, "no <action>…</action> block in the output")


def tau2_agent_action(text: str) -> ParsedAction:
    """The τ² agent turn to send to the τ² adapter: the output without its reasoning, stripped.

    The adapter parses it (`rwml_jax.envs.tau2_parse.parse_turn`); ``format_ok`` mirrors what it will find:
    False for an empty turn or a malformed ``<tool_call>`` block (τ² answers those with an error message and
    counts the step invalid).
    """
    if not isinstance(text, str):
        raise TypeError(f"policy output must be a str, got {type(text).__name__}")
    has_think = _THINK_RE.search(text) is not None
    visible = strip_reasoning(text).strip()
    parsed = parse_turn(visible)
    if parsed.is_empty:
        return ParsedAction(visible, False, has_think, "empty turn: no message and no tool call")
    bad = [c.error for c in parsed.calls if not c.ok]
    if bad:
        return ParsedAction(visible, False, has_think, bad[0])
    return ParsedAction(visible, True, has_think)
