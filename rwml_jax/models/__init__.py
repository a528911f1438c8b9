"""Models: the decoder (Qwen2 / Qwen3 / Llama 3 / Qwen3-MoE) as one block, its attention strategies and forward, HF
checkpoint I/O, tokenizer training, and embedding models (BERT / decoder embedders)."""

from rwml_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError
from rwml_jax.models.decoder import (
    apply,
    forward,
    init_cache,
    init_params,
    init_params_sharded,
    param_logical_axes,
    param_shardings,
)
from rwml_jax.models.hf_io import CheckpointError, load_pretrained, save_pretrained


def load_embedder(path, **kwargs):
    """Load a sentence-transformers (BERT) or decoder embedding model; see `rwml_jax.models.embedder`."""
    from rwml_jax.models.embedder import load_embedder as _load

    return _load(path, **kwargs)


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "ModelConfig",
    "UnsupportedModelError",
    "apply",
    "forward",
    "init_cache",
    "init_params",
    "init_params_sharded",
    "load_embedder",
    "load_pretrained",
    "param_logical_axes",
    "param_shardings",
    "save_pretrained",
]
