"""The gold conversation of a τ² task, as text turns: what the gold replay, the scripted gold user, the
`gold` reference policy and the imitation-learning corpus play.

The agent turns replay the gold actions of ``task.evaluation_criteria.actions`` in their order (a tool call
per assistant action; for a user action, a request that the user perform it) and end with one message that
carries every ``communicate_info`` string; the user turns open the conversation, perform the requested
user-side tool calls ("Done." after each) and end it with ``###STOP###``.
"""

from __future__ import annotations

from typing import Any

from rwml_jax.envs.tau2_parse import format_tool_call

USER_OPENER = "Hi, I need some help."


def gold_script(task: Any) -> tuple[list[str], list[str]]:
    """(agent turns, user turns) that replay ``task``'s gold actions and communicate its required info."""
    criteria = task.evaluation_criteria
    actions = (criteria.actions or []) if criteria is not None else []
    agent_turns: list[str] = []
    user_turns = [USER_OPENER]
    for a in actions:
        if a.requestor == "assistant":
            agent_turns.append(format_tool_call(a.name, a.arguments))
        else:
            agent_turns.append(f"Please perform this action on your side: {a.name}.")
            user_turns += [format_tool_call(a.name, a.arguments), "Done."]
    info = (criteria.communicate_info or []) if criteria is not None else []
    closing = "Here is what you need to know: " + " ; ".join(info) + "." if info else "Is there anything else?"
    agent_turns.append(closing)
    user_turns.append("###STOP###")
    return agent_turns, user_turns
