"""Shape buckets: prompts and batches are padded to a few sizes so varying inputs reuse compiled code.

A compiled prefill / decode pair is specific to (batch rows B, prompt slots P, cache slots S = P + N); padding
real inputs up to bucket sizes means an RL loop whose prompts vary in count and length hits a handful of
shapes instead of compiling for every call.

Default prompt buckets: powers of two from 16 up to 2048, then multiples of 1024.
Default batch buckets: powers of two, rounded up to a multiple of the mesh's batch-sharding size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_PROMPT_BUCKET = 16


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def prompt_bucket(length: int, buckets: Sequence[int] | None = None) -> int:
    """The prompt slot count P for a longest prompt of `length` tokens."""
    if buckets:
        for b in sorted(buckets):
            if b >= length:
                return int(b)
        raise ValueError(f"a prompt has {length} tokens, more than the largest prompt bucket {max(buckets)}")
    if length <= 2048:
        return max(MIN_PROMPT_BUCKET, next_pow2(length))
    return -(-length // 1024) * 1024


def batch_bucket(rows: int, multiple: int = 1) -> int:
    """The padded batch size for `rows` prompts: a power of two, and a multiple of `multiple`."""
    b = next_pow2(max(rows, 1))
    return -(-b // multiple) * multiple


def left_pad(prompts: Sequence[Sequence[int]], length: int, batch: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into (ids [batch, length] int32, mask [batch, length] bool).

    Rows past len(prompts) are all padding (mask False); they are generated for and discarded.
    """
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), bool)
    for r, p in enumerate(prompts):
        n = len(p)
        if n:
            ids[r, length - n:] = p
            mask[r, length - n:] = True
    return ids, mask
