"""Rotary position embeddings (the Hugging Face "rotate half" layout) with Llama-3 / linear scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from rwml_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim // 2] in radians per position (float64 on the host)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_param("factor")
    elif config.rope_type == "llama3":
        factor = config.rope_param("factor")
        low = config.rope_param("low_freq_factor")
        high = config.rope_param("high_freq_factor")
        old_len = config.rope_param("original_max_position_embeddings")
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(config: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin tables [batch, seq, head_dim] (float32) for integer `positions` [batch, seq]."""
    inv_freq = jnp.asarray(inverse_frequencies(config))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate `x` [batch, seq, heads, head_dim] by the tables [batch, seq, head_dim]; float32 math."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(dtype)
