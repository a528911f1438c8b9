"""The sampler's on-device state: why a row finished, and the decode loop's carried state."""

from __future__ import annotations

import enum
from typing import Any

import jax
from flax import struct


class FinishReason(enum.IntEnum):
    """Why a row stopped generating (stored per row on device as int32)."""

    NONE = 0  # still generating (or a padding row)
    STOP_TOKEN = 1  # a stop token id (EOS by default) was generated; it is the last token
    STOP_STRING = 2  # a stop string was completed; the completing token is the last token
    LENGTH = 3  # max_new_tokens reached

    @property
    def label(self) -> str:
        """The name `GenerationResult.finish_reason` reports: "stop_token", "stop_string" or "length"."""
        return self.name.lower()


@struct.dataclass
class DecodeState:
    """What the prefill produces and every decode step carries (B rows, N = max_new_tokens capacity,
    W = the stop-string window).

    cache: the per-layer KV cache of `rwml_jax.models.decoder` (k: L x [B, K, D, S], v: L x [B, K, S, D],
      mask [B, S], pos [B], index [])
    tokens: [B, N] int32, the generated ids (-1 after a row's end)
    logprobs: [B, N] float32, their log-probs under the tempered policy (0 after a row's end)
    window: [B, W] int32, the last W tokens of each row (stop strings)
    last: [B] int32, each row's latest token (the next step's input)
    done: [B] bool; reason: [B] int32 (`FinishReason`); lengths: [B] int32 tokens generated
    step: [] int32, decode steps taken
    prefix: the prompts' shared prefix (k: L x [Bp, K, D, P], v: L x [Bp, K, P, D], mask [Bp, P]) when the
      rows continue shared prompts (num_samples > 1), else None
    """

    cache: dict[str, Any]
    tokens: jax.Array
    logprobs: jax.Array
    window: jax.Array
    last: jax.Array
    done: jax.Array
    reason: jax.Array
    lengths: jax.Array
    step: jax.Array
    prefix: dict[str, Any] | None = None
