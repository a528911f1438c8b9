"""Chat-level generation: apply the tokenizer's chat template to message lists, generate, return texts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rwml_jax.models.config import ModelConfig
from rwml_jax.sampling.generate import generate
from rwml_jax.sampling.outputs import GenerationOutput

Message = Mapping[str, str]


def _check_conversations(conversations: Any) -> list[list[Message]]:
    if isinstance(conversations, (str, Mapping)) or not isinstance(conversations, Sequence):
        raise ValueError("conversations must be a list of conversations, each a list of {'role', 'content'} dicts")
    out = []
    for i, conv in enumerate(conversations):
        if isinstance(conv, (str, Mapping)) or not isinstance(conv, Sequence) or len(conv) == 0:
            raise ValueError(f"conversation {i} must be a non-empty list of {{'role', 'content'}} dicts; got {conv!r:.80}")
        for j, m in enumerate(conv):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"conversation {i}, message {j} needs str 'role' and 'content'; got {m!r:.80}")
        out.append(list(conv))
    return out


def apply_chat_template(
    tokenizer: Any, conversations: Sequence[Sequence[Message]], *, add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> list[list[int]]:
    """Prompt token ids for each conversation, rendered with the tokenizer's chat template.

    template_kwargs go to the template (e.g. `enable_thinking=False` for Qwen3). The rendered text is
    encoded without adding special tokens (the template already has them).
    """
    convs = _check_conversations(conversations)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template; set tokenizer.chat_template "
                         "or pass token-id prompts to rwml_jax.sampling.generate")
    out = []
    for conv in convs:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in conv], tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
        )
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def generate_chat(
    config: ModelConfig,
    params: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 256,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    return_output: bool = False,
    **generate_kwargs: Any,
) -> list[str] | GenerationOutput:
    """Complete each conversation with one assistant turn and return the texts.

    conversations: list of message lists [{"role": "system" | "user" | "assistant", "content": str}, ...].
    The chat template's generation prompt is appended, generation stops at the tokenizer's EOS (end of
    turn) and any `stop_strings`; the texts exclude special tokens. generate_kwargs go to `generate`
    (temperature, top_p, top_k, seed, stop_strings, mesh, ...). return_output: the full
    `GenerationOutput` (token ids, log-probs) instead of the texts.
    """
    prompts = apply_chat_template(tokenizer, conversations, **dict(chat_template_kwargs or {}))
    out = generate(config, params, prompts, max_new_tokens=max_new_tokens, tokenizer=tokenizer, **generate_kwargs)
    return out if return_output else list(out.texts)
