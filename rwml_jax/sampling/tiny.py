"""A tiny random Qwen3 model and a small byte-level BPE tokenizer, built offline in seconds.

For the `rwml-jax generate --tiny` demo and for tests: the weights are random, so the text is gibberish,
but every code path (chat template, stop strings, EOS, log-probs) is the real one.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax

from rwml_jax.models import decoder
from rwml_jax.models.config import ModelConfig
from rwml_jax.models.tokenizer import train_tokenizer

_CORPUS = [
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1, "
    "a drawer 2, a fridge 1, a garbagecan 1, a microwave 1, a shelf 3, a sinkbasin 1, and a toaster 1.",
    "Your task is to: put a clean mug in the coffeemachine.",
    "Thought: I need to find a mug first. It is likely on the countertop or in a cabinet.",
    "Action: go to countertop 1\nObservation: On the countertop 1, you see a mug 2 and a knife 1.",
    "Action: take mug 2 from countertop 1\nObservation: You pick up the mug 2 from the countertop 1.",
    "Action: clean mug 2 with sinkbasin 1\nObservation: You clean the mug 2 using the sinkbasin 1.",
    "The user wants to change the flight reservation to next Tuesday and asks about the baggage fee.",
    "I can help you with that. Could you give me your user id and the reservation number, please?",
]


def tiny_tokenizer(out_dir: str | os.PathLike | None = None, vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer with a ChatML template (EOS = <|im_end|>), trained on a built-in corpus."""
    out_dir = out_dir or tempfile.mkdtemp(prefix="rwml_tiny_tok_")
    return train_tokenizer(_CORPUS * 4, out_dir, vocab_size=vocab_size)


def tiny_config(vocab_size: int, eos_token_id: int | None = None, **overrides: Any) -> ModelConfig:
    """A 2-layer Qwen3-architecture config (GQA, q/k norm, tied embeddings)."""
    kw: dict[str, Any] = dict(
        model_type="qwen3", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True,
        rope_theta=1e6, eos_token_id=eos_token_id,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def tiny_model(tokenizer: Any, seed: int = 0, **overrides: Any) -> tuple[ModelConfig, Any]:
    """(config, random params) sized for `tokenizer`, with its EOS as the model's EOS."""
    config = tiny_config(len(tokenizer), tokenizer.eos_token_id, **overrides)
    return config, decoder.init_params(config, jax.random.key(seed))
