"""Chat messages and completion texts -> token ids, the way every stage feeds the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rwml_jax.agent.prompts import render_plain

Message = dict[str, Any]


def encode_prompt(tokenizer: Any, messages: Sequence[Message], max_tokens: int,
                  template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Render `messages` with the tokenizer's chat template (plus the assistant header) -> ids.
    template_kwargs: extra chat-template variables (e.g. ``{"enable_thinking": False}`` for Qwen3).

    Prompts longer than `max_tokens` keep their *last* `max_tokens` tokens (the current state and the
    question are at the end; the oldest history goes first).
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                            **(template_kwargs or {}))
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
    else:

        ids = tokenizer(render_plain(list(messages)), add_special_tokens=True)["input_ids"]
    return list(ids[-max_tokens:])


def encode_completion(tokenizer: Any, text: str, max_tokens: int | None = None) -> list[int]:
    """Ids of an assistant reply `text` followed by the end-of-turn token (truncated to `max_tokens`)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[: max_tokens - 1]
    return list(ids) + [tokenizer.eos_token_id]


def stop_ids(tokenizer: Any, model_config: Any = None) -> tuple[int, ...]:
    """Token ids that end a reply: the tokenizer's EOS (end of turn) and the model's EOS ids."""
    ids = {tokenizer.eos_token_id}
    if model_config is not None:
        ids.update(model_config.eos_token_ids)
    return tuple(sorted(i for i in ids if i is not None))


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)
