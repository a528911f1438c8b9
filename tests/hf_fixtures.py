"""Tiny random Hugging Face checkpoints built with the PyTorch `transformers` classes (no hub access)."""

from __future__ import annotations

import os

import numpy as np

# name -> (model_type, config kwargs). Variants cover GQA, MQA, tied / untied embeddings, head_dim
# independent of hidden/heads, q/k/v bias (Qwen2), q/k norm (Qwen3), Llama-3 rope scaling.
VARIANTS: dict[str, tuple[str, dict]] = {
    "qwen2-gqa-untied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2-mqa-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3-gqa-tied-oddhd": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "qwen3-mqa-untied": ("qwen3", dict(num_attention_heads=6, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3-bias": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8, attention_bias=True)),
    "llama3-scaled": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                                     rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=16))),
    "llama-mqa-tied-oddhd": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
}

# Qwen3-MoE variants (tests/test_moe.py): normalised and unnormalised top-k, sparse step > 1, dense layers
# listed, tied and untied heads, GQA / MQA; every one has sparse and (but the first) dense layers.
MOE_BASE = dict(num_hidden_layers=4, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2)
MOE_VARIANTS: dict[str, tuple[str, dict]] = {
    "moe-norm-gqa-untied": ("qwen3_moe", dict(MOE_BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              norm_topk_prob=True, tie_word_embeddings=False)),
    "moe-unnorm-step2-tied": ("qwen3_moe", dict(MOE_BASE, num_attention_heads=4, num_key_value_heads=1, head_dim=12,
                                                norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=True,
                                                num_experts_per_tok=3)),
    "moe-mlp-only-bias": ("qwen3_moe", dict(MOE_BASE, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                            norm_topk_prob=True, mlp_only_layers=[0, 2], attention_bias=True)),
}

BASE = dict(vocab_size=160, hidden_size=48, intermediate_size=80, num_hidden_layers=3, max_position_embeddings=512, rms_norm_eps=1e-6)


def build_hf_model(variant: str, path: str, seed: int = 0):
    """Create, randomise (incl. norms and biases, so they matter) and save a tiny model; return it."""
    import torch
    import transformers

    model_type, kw = {**VARIANTS, **MOE_VARIANTS}[variant]
    cls_cfg = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig,
               "qwen3_moe": transformers.Qwen3MoeConfig}[model_type]
    cls_model = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
                 "llama": transformers.LlamaForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM}[model_type]
    cfg = cls_cfg(**{**BASE, **kw})
    torch.manual_seed(seed)
    model = cls_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # the router: spread its probabilities
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def padded_batch(vocab: int, lengths: list[int], left: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids [B, max(lengths)] and a 0/1 mask, padded on the left or right with id 0."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        sl = slice(T - n, T) if left else slice(0, n)
        ids[b, sl] = rng.integers(1, vocab, n)
        mask[b, sl] = 1
    return ids, mask


def rel_err(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Largest error over the real tokens relative to the largest reference value there."""
    m = mask.astype(bool)
    return float(np.abs(ours[m] - ref[m]).max() / np.abs(ref[m]).max())


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference logits with positions that skip padding (what `generate` uses for left padding)."""
    import torch

    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def tmp_model_dir(tmp_path_factory, variant: str) -> str:
    path = str(tmp_path_factory.mktemp(variant))
    build_hf_model(variant, path)
    return path if os.path.isdir(path) else path
