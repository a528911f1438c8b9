"""Stop conditions: stop token ids and stop strings, checked on device and finished on the host.

On device (inside the decode loop) a row stops when its new token is a stop token id, or when its last
generated tokens equal one of the stop *sequences*. A stop string `s` contributes (a) the sequence of its
canonical tokenization `tokenizer.encode(s)` and (b) every vocabulary token whose text contains `s` (a
single-token sequence). A model can still spell `s` with other tokens (e.g. "\\n" fused into ".\\n"); such a
row is not stopped early on device but keeps decoding, and the host truncation below cuts it at the same
place, so the result is the same, only the early exit is missed.

On the host, after decoding, each row's tokens are cut at the first token whose decoded text completes a
stop string (that token is kept: its log-prob is part of the sample); the row's text is cut just before the
stop string. Only generated text is searched, never the prompt.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# tokenizer -> {stop string: vocabulary ids whose decoded text contains it}
_CONTAINING: "weakref.WeakKeyDictionary[Any, dict[str, tuple[int, ...]]]" = weakref.WeakKeyDictionary()
_MAX_TOKEN_SCAN = 300_000  # vocabularies above this are not scanned for tokens containing a stop string


def _pow2(n: int, minimum: int = 1) -> int:
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class StopCriteria:
    """Stop token ids, stop token sequences (device side) and stop strings (host side)."""

    token_ids: tuple[int, ...] = ()
    sequences: tuple[tuple[int, ...], ...] = ()
    strings: tuple[str, ...] = ()

    def device_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [n], sequences [m, W] right-aligned, lengths [m]) int32, padded to power-of-two sizes.

        Padding ids are -1 (never sampled); padding sequences have length 0 (never match). The sizes are
        part of the compiled decode loop's signature, so they are bucketed to limit recompilation.
        """
        ids = np.full((_pow2(len(self.token_ids), 4),), -1, np.int32)
        ids[: len(self.token_ids)] = self.token_ids
        width = _pow2(max((len(s) for s in self.sequences), default=1))
        seqs = np.full((_pow2(len(self.sequences)), width), -1, np.int32)
        lens = np.zeros((seqs.shape[0],), np.int32)
        for j, s in enumerate(self.sequences):
            seqs[j, width - len(s):] = s
            lens[j] = len(s)
        return ids, seqs, lens


def _containing_tokens(tokenizer: Any, s: str) -> tuple[int, ...]:
    try:
        memo = _CONTAINING.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no memo
        memo = {}
    if s not in memo:
        n = len(tokenizer)
        if n > _MAX_TOKEN_SCAN:
            memo[s] = ()
        else:
            texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
            memo[s] = tuple(i for i, t in enumerate(texts) if s in t)
    return memo[s]


def build_stop_criteria(
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] | str | None = None,
    tokenizer: Any = None,
    vocab_size: int | None = None,
) -> StopCriteria:
    """Validate and assemble the stop conditions; raises ValueError naming a bad entry."""
    ids = []
    for t in stop_token_ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 or (vocab_size and t >= vocab_size):
            raise ValueError(f"stop token id {t!r} is not a token id in [0, {vocab_size or 'vocab_size'})")
        if int(t) not in ids:
            ids.append(int(t))
    if stop_strings is None:
        return StopCriteria(token_ids=tuple(ids))
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    strings = tuple(stop_strings)
    if strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (pass tokenizer=...) to be matched against generated text")
    seqs: list[tuple[int, ...]] = []
    for s in strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop string {s!r} must be a non-empty str")
        canonical = tuple(int(i) for i in tokenizer.encode(s, add_special_tokens=False))
        if canonical and canonical not in seqs:
            seqs.append(canonical)
        for i in _containing_tokens(tokenizer, s):
            if (i,) not in seqs:
                seqs.append((i,))
    return StopCriteria(token_ids=tuple(ids), sequences=tuple(seqs), strings=strings)


# --------------------------------------------------------------------------------------------- device
def push_window(window: jax.Array, tokens: jax.Array) -> jax.Array:
    """Shift the last-W-tokens window [B, W] left by one and append tokens [B]."""
    return jnp.concatenate([window[:, 1:], tokens[:, None]], axis=1)


def stop_hits(
    tokens: jax.Array, window: jax.Array, stop_ids: jax.Array, stop_seqs: jax.Array, stop_lens: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(token_hit [B], sequence_hit [B]) bool for new tokens [B] and the window [B, W] that ends with them.

    stop_seqs [m, W] are right-aligned; position w of sequence j is compared only if w >= W - len_j.
    """
    token_hit = jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)
    W = window.shape[1]
    care = jnp.arange(W)[None, :] >= (W - stop_lens)[:, None]  # [m, W]
    equal = window[:, None, :] == stop_seqs[None, :, :]  # [B, m, W]
    seq_hit = jnp.any(jnp.all(equal | ~care[None], axis=-1) & (stop_lens > 0)[None, :], axis=-1)
    return token_hit, seq_hit


# ----------------------------------------------------------------------------------------------- host
def truncate_at_stop_string(tokenizer: Any, token_ids: Sequence[int], strings: Sequence[str]) -> tuple[int, str] | None:
    """(tokens to keep, text before the stop string) for the first stop string in the decoded tokens.

    None when no stop string occurs. The kept tokens end with the token that completes the stop string:
    the shortest prefix whose decoded text contains one (found by bisection over prefixes).
    """
    if not strings or not token_ids:
        return None
    text = tokenizer.decode(list(token_ids), skip_special_tokens=False)
    if not any(s in text for s in strings):
        return None
    lo, hi = 1, len(token_ids)  # the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        prefix = tokenizer.decode(list(token_ids[:mid]), skip_special_tokens=False)
        if any(s in prefix for s in strings):
            hi = mid
        else:
            lo = mid + 1
    kept = tokenizer.decode(list(token_ids[:lo]), skip_special_tokens=True)
    cut = min((kept.find(s) for s in strings if s in kept), default=len(kept))
    return lo, kept[:cut]
