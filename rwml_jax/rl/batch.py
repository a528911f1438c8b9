"""Pack prompts and completions into the fixed-shape arrays the update steps consume.

A training batch is a dict of NumPy (or jax) arrays, B rows, T = prompt + completion slots, C the
completion length:

    input_ids         [B, T] int32   prompt and completion tokens, `pad_id` elsewhere
    attention_mask    [B, T] int32   1 on real tokens
    completion_start  [B]    int32   index in T of each row's first completion token (>= 1)
    completion_mask   [B, C] int32   1 on real completion tokens; completion token j of row b sits at
                                     input_ids[b, completion_start[b] + j]

GRPO adds `advantages` [B] float32 and, optionally, `old_logp` [B, C] float32 (the sampler's log-probs
of the completion tokens); without it the ratio is 1 (strictly on-policy, one update per batch).

Layouts (`layout=`):
  "split": prompt left-padded to P slots, completion right-padded to C slots (T = P + C); every row's
           completion starts at P. This is what the sampler produces, and the cheapest to score.
  "right": prompt and completion contiguous from slot 0, padding on the right.
  "left":  prompt and completion contiguous, ending at slot T - 1, padding on the left.
Positions skip padding (the decoder derives them from the mask), so all layouts give the same log-probs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LAYOUTS = ("split", "right", "left")

Batch = dict[str, Any]


def pack(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    prompt_len: int | None = None,
    completion_len: int | None = None,
    layout: str = "split",
    pad_id: int = 0,
    seq_len: int | None = None,
) -> Batch:
    """Pack token-id lists into a batch (see the module docstring for the arrays and layouts).

    prompt_len / completion_len: slots for prompts / completions (default: the longest). For the
    contiguous layouts T = prompt_len + completion_len as well, so shapes do not depend on the layout,
    unless `seq_len` sets T (>= every row's prompt + completion; rows of long prompts and short
    completions, or the reverse, then share fewer padded slots).
    Raises ValueError naming the row when a prompt is empty or a sequence does not fit.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("cannot pack an empty batch")
    P = prompt_len if prompt_len is not None else max(len(p) for p in prompts)
    C = completion_len if completion_len is not None else max(1, max(len(c) for c in completions))
    if seq_len is not None and layout == "split" and seq_len != P + C:
        raise ValueError(f"layout='split' has T = prompt_len + completion_len = {P + C}; got seq_len={seq_len}")
    T = P + C if seq_len is None else seq_len
    B = len(prompts)
    ids = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.int32)
    start = np.zeros((B,), np.int32)
    cmask = np.zeros((B, C), np.int32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        n_p, n_c = len(p), len(c)
        if n_p == 0:
            raise ValueError(f"row {b}: empty prompt (the first completion token needs a context)")
        if n_p > P:
            raise ValueError(f"row {b}: prompt has {n_p} tokens, more than prompt_len={P}")
        if n_c > C:
            raise ValueError(f"row {b}: completion has {n_c} tokens, more than completion_len={C}")
        if n_p + n_c > T:
            raise ValueError(f"row {b}: prompt + completion has {n_p + n_c} tokens, more than seq_len={T}")
        if layout == "split":
            p0, c0 = P - n_p, P
        elif layout == "right":
            p0, c0 = 0, n_p
        else:
            p0 = T - n_p - n_c
            c0 = p0 + n_p
        ids[b, p0:p0 + n_p] = np.asarray(p, np.int32)
        ids[b, c0:c0 + n_c] = np.asarray(c, np.int32)
        mask[b, p0:p0 + n_p] = 1
        mask[b, c0:c0 + n_c] = 1
        start[b] = c0
        cmask[b, :n_c] = 1
    return dict(input_ids=ids, attention_mask=mask, completion_start=start, completion_mask=cmask)


def from_sampler(
    prompt_ids: Any,
    prompt_mask: Any,
    completion_ids: Any,
    completion_mask: Any,
) -> Batch:
    """Concatenate a left-padded prompt block [B, P] and a right-padded completion block [B, C] (the
    sampler's output) into a "split"-layout batch without re-packing row by row."""
    prompt_ids = np.asarray(prompt_ids, np.int32)
    completion_ids = np.asarray(completion_ids, np.int32)
    prompt_mask = np.asarray(prompt_mask).astype(np.int32)
    completion_mask = np.asarray(completion_mask).astype(np.int32)
    if prompt_ids.shape != prompt_mask.shape or completion_ids.shape != completion_mask.shape:
        raise ValueError(
            f"ids and masks disagree: prompt {prompt_ids.shape} vs {prompt_mask.shape}, "
            f"completion {completion_ids.shape} vs {completion_mask.shape}"
        )
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"{prompt_ids.shape[0]} prompt rows but {completion_ids.shape[0]} completion rows")
    if not prompt_mask[:, -1].all():
        bad = np.flatnonzero(prompt_mask[:, -1] == 0)[:5].tolist()
        raise ValueError(f"prompts must be left-padded (rows {bad} end with padding)")
    B, P = prompt_ids.shape
    return dict(
        input_ids=np.concatenate([prompt_ids, completion_ids], axis=1),
        attention_mask=np.concatenate([prompt_mask, completion_mask], axis=1),
        completion_start=np.full((B,), P, np.int32),
        completion_mask=completion_mask,
    )


def with_grpo_fields(batch: Batch, advantages: Any, old_logp: Any | None = None) -> Batch:
    """Add GRPO's `advantages` [B] and optional sampler log-probs `old_logp` [B, C] to a batch."""
    B, C = np.shape(batch["completion_mask"])
    out = dict(batch)
    adv = np.asarray(advantages, np.float32)
    if adv.shape != (B,):
        raise ValueError(f"advantages have shape {adv.shape}, expected ({B},)")
    out["advantages"] = adv
    if old_logp is not None:
        old = np.asarray(old_logp, np.float32)
        if old.shape != (B, C):
            raise ValueError(f"old_logp has shape {old.shape}, expected ({B}, {C})")
        out["old_logp"] = np.where(np.asarray(batch["completion_mask"]) > 0, old, 0.0).astype(np.float32)
    return out


def pad_logprobs(rows: Sequence[Any], width: int) -> np.ndarray:
    """Ragged per-token log-probs (one 1-D array per row) -> [len(rows), width] float32, zeros after each
    row's end (`old_logp` for `with_grpo_fields`). Rows longer than `width` are cut."""
    out = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        n = min(len(r), width)
        out[i, :n] = np.asarray(r, np.float32)[:n]
    return out


def pad_rows(batch: Batch, rows: int) -> Batch:
    """`batch` grown to `rows` rows (a few fixed shapes keep the jitted step from recompiling for every
    multi-turn batch): the extra rows repeat row 0 with an empty completion mask and zero advantage, so they
    add nothing to the loss, its token or sequence count, or the metrics."""
    B = np.shape(batch["completion_mask"])[0]
    if rows < B:
        raise ValueError(f"cannot pad a batch of {B} rows to {rows}")
    if rows == B:
        return dict(batch)
    out = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[:1], rows - B, axis=0)]) for k, v in batch.items()}
    out["completion_mask"][B:] = 0
    if "advantages" in out:
        out["advantages"][B:] = 0.0
    if "old_logp" in out:
        out["old_logp"][B:] = 0.0
    return out
