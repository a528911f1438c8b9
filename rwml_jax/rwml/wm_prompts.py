"""World-model prompts: given the context of a triplet and a candidate action, predict the next state.

The model reasons inside ``<think></think>`` and answers inside ``<next_state></next_state>`` (the reward
parses the last ``<next_state>`` block; a missing one scores 0). Prompts are chat messages (system + user) so
the sampler's chat helper applies the model's chat template; `wm_prompt_text` renders them as plain text for
tokenizers without one. `wm_sft_target` is the WM-SFT baseline's (and the filter model's) target text.

ALFWorld (paper, paraphrased): the task, the previous (observation, action) steps, the current observation,
the potential action; "predict the immediate next observation".

τ²: the user's known profile (never the hidden intent), the domain's tool signatures, a ``# History`` block
(the agent's greeting when the window reaches the start, then the last H (state, action) pairs and the
current state, each line tagged with who spoke), the candidate agent turn, and the instruction to predict the
next user / tool response and whether the task is complete (the user ends the conversation with
``###STOP###``); for JSON tool responses only the schema is asked for, with an example of the format the
targets are masked to (`rwml_jax.envs.schema_mask`).
"""

from __future__ import annotations

from typing import Any

from rwml_jax.agent.prompts import Message, render_plain
from rwml_jax.rwml.triplets import Triplet

NEXT_STATE_OPEN = "<next_state>"
NEXT_STATE_CLOSE = "</next_state>"

ALFWORLD_WM_SYSTEM = (
    "You are a world model of the ALFRED household environment, a text game. Given what has happened so far "
    "and an action the agent is about to take, you predict the exact text the environment answers with."
)

ALFWORLD_WM_USER = """\
The agent's task is to: {task}
{history}Current observation: {state}
Potential action: {action}

Predict the immediate next observation the environment returns after this action (if the action cannot be \
carried out, the environment answers "Nothing happens."). First reason inside <think></think>, then give the \
predicted observation inside <next_state></next_state>."""

TAU2_WM_SYSTEM = (
    "You are a world model of a customer-service conversation in the {domain} domain of tau2-bench. You "
    "simulate everything the service agent interacts with: the customer (the user) and the domain's tools, "
    "which read and write a database."
)

TAU2_WM_USER = """\
# User profile
{profile}

# Tools
{tools}

# History
{history}

# Candidate agent turn
{action}

# Instruction
{instruction}"""

TAU2_KIND_INSTRUCTION = {
    "tool_response": (
        "The candidate turn calls tools, so the next state is the tools' response. Predict it. For a JSON "
        "response give only its schema (types, not values), e.g. "
        '{"type": "object", "properties": {"user_id": {"type": "string"}, "age": {"type": "integer"}}}; '
        "give error messages and plain-text results as they would appear. Several calls: one "
        "<tool_response>...</tool_response> block per call, in order."),
    "user_reply": (
        "The candidate turn is a message to the user, so the next state is the user's reply. Predict it, and "
        "whether the task is complete: if the user would end the conversation, the reply ends with ###STOP###."),
    "observation": (
        "Predict the response the agent receives next."),
}
TAU2_ANSWER_FORMAT = ("First reason inside <think></think>, then give the predicted response inside "
                      "<next_state></next_state>.")
# the authors' scripts' variant (triplets.ask_task_status): a last line with the task's status after the turn
TASK_STATUSES = ("successfully completed", "not yet completed", "failed")
TAU2_STATUS_LINE = ("After </next_state>, end with one line: 'Task status: ' followed by 'successfully completed', "
                    "'not yet completed' or 'failed'.")

_SPEAKER = {"user_reply": "user", "tool_response": "tool", "observation": "environment"}


def _alfworld_history(t: Triplet) -> str:
    if not t.history:
        return ""
    first = t.step - len(t.history) + 1
    lines = [f"[Observation {first + j}: '{h.state.strip()}', Action {first + j}: '{h.action}']"
             for j, h in enumerate(t.history)]
    return "Previous steps (oldest first):\n" + "\n".join(lines) + "\n"


def _tau2_history(t: Triplet) -> str:
    lines = []
    greeting = t.context.get("greeting")
    if greeting and t.step - len(t.history) == 0:  # the window reaches the start of the conversation
        lines.append(f"[agent] {greeting}")
    for h in t.history:
        lines.append(f"[{_SPEAKER.get(h.state_kind, h.state_kind)}] {h.state}")
        lines.append(f"[agent] {h.action}")
    lines.append(f"[{_SPEAKER.get(t.state_kind, t.state_kind)}] {t.state}")
    return "\n".join(lines)


def _profile(t: Triplet) -> str:
    known = t.context.get("user_known_info")
    return str(known).strip() if known else "(unknown)"


def wm_messages(t: Triplet, *, include_tools: bool = True) -> list[Message]:
    """The world-model prompt of one triplet as [system, user] chat messages."""
    if t.env == "alfworld":
        user = ALFWORLD_WM_USER.format(task=t.task or "(not given)", history=_alfworld_history(t),
                                       state=t.state.strip(), action=t.action)
        return [{"role": "system", "content": ALFWORLD_WM_SYSTEM}, {"role": "user", "content": user}]
    if t.env == "tau2":
        tools = t.context.get("tool_signatures") or []
        tools_text = "\n".join(f"- {s}" for s in tools) if (include_tools and tools) else "(not listed)"
        instruction = TAU2_KIND_INSTRUCTION.get(t.kind, TAU2_KIND_INSTRUCTION["observation"])
        user = TAU2_WM_USER.format(profile=_profile(t), tools=tools_text, history=_tau2_history(t),
                                   action=t.action if t.action.strip() else "(empty turn)",
                                   instruction=f"{instruction} {TAU2_ANSWER_FORMAT}"
                                   + (f" {TAU2_STATUS_LINE}" if t.context.get("task_status") else ""))
        system = TAU2_WM_SYSTEM.format(domain=t.context.get("domain") or "customer-service")
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    raise ValueError(f"no world-model prompt for env {t.env!r}; known: 'alfworld', 'tau2'")


def wm_prompt_text(t: Triplet, *, include_tools: bool = True) -> str:
    """`wm_messages` rendered as plain text (tokenizers without a chat template)."""
    return render_plain(wm_messages(t, include_tools=include_tools))


def wm_sft_target(next_state: str, task_status: str = "") -> str:
    """The next-state SFT target: ``<think> </think><next_state>{s}</next_state>`` (paper's WM-SFT baseline),
    then ``Task status: …`` when the triplet's prompt asks for it (`triplets.ask_task_status`)."""
    status = f"\nTask status: {task_status}" if task_status else ""
    return f"<think> </think>{NEXT_STATE_OPEN}{next_state}{NEXT_STATE_CLOSE}{status}"


def wm_example(t: Triplet, *, chat: bool = True, include_tools: bool = True) -> dict[str, Any]:
    """Prompt + SFT target + reward metadata of one triplet, the record the filter / RWML / WM-SFT stages use."""
    prompt: Any = wm_messages(t, include_tools=include_tools) if chat else wm_prompt_text(t, include_tools=include_tools)
    return {"id": t.id, "env": t.env, "kind": t.kind, "prompt": prompt, "target": wm_sft_target(t.next_state, t.context.get("task_status", "")),
            "next_state": t.next_state}
