"""GRPO's shared prompts: each group's prompt runs through the model once, not once per completion.

A GRPO batch holds G completions of every prompt, rows ordered group by group. In the plain layout
(`rwml_jax.rl.batch`) every row carries its own copy of the prompt, so the forward and backward
passes process each prompt G times. Here a group is one sequence of P + G*C tokens, its prompt
followed by its G completions, with an attention pattern that lets completion g see the prompt and its
own earlier tokens only:

    prompt token i       -> prompt tokens <= i (real ones)
    completion g, tok j  -> every real prompt token, and completion g's real tokens <= j

RoPE positions are those of the plain layout (completion token j of a prompt with n real tokens sits at
position n + j), so the log-probs and the gradient are the plain layout's up to float rounding: the
gradient that reaches a prompt token is the sum of what its G copies would receive.
What it saves: with prompt P and completion C the layers process P + G*C tokens per group instead of
G*(P + C); for the GRPO workload (P = C = 128, G = 8) 9,216 tokens instead of 16,384 per update (the
LM head already runs on completion positions only).

Grouped batch (device side), bp groups of G rows:

    prompt_ids       [bp, P]     int32  left-padded prompts
    prompt_mask      [bp, P]     int32
    completion_ids   [bp, G, C]  int32  right-padded completions
    completion_mask  [bp, G, C]  int32
    advantages       [bp, G]     float32  (and old_logp / ref_logp [bp, G, C] when given)

`group_batch` builds it from a "split"-layout batch and checks that the rows of each group really share
their prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwml_jax import platform
from rwml_jax.models import attention, decoder
from rwml_jax.models.block import ParamWeights
from rwml_jax.models.config import ModelConfig

Batch = dict[str, Any]
# per-row entries with a completion axis: [B, C] in the plain layout, [bp, G, C] grouped
_ROW_KEYS = ("completion_mask", "advantages", "old_logp", "ref_logp")


def micro_batching(num_prompts: int, group_size: int, micro_batch_size: int, devices: int) -> tuple[int, int | None]:
    """(prompt_group_size, micro_batch_size) for a GRPO batch of num_prompts x group_size rows on a mesh
    with `devices` = data x fsdp devices, sharing prompts as far as the mesh allows.

    Shared prompts make a group the unit that is sharded and split into micro-batches, so each device
    needs whole groups. The rows of a group may also share their prompt in sub-groups (consecutive rows
    of one group still have one prompt), so this picks the largest divisor g of group_size for which the
    batch's sub-groups spread evenly over the devices, and rounds micro_batch_size up to the smallest
    multiple of g x devices that divides the batch (one sub-group per device at least). Returns
    (0, micro_batch_size) when no g > 1 fits (every row runs its own prompt); a micro_batch_size of None
    means the whole batch at once.
    """
    rows = num_prompts * group_size
    for g in range(group_size, 1, -1):
        if group_size % g or (rows // g) % devices:
            continue
        unit = g * devices
        micro = -(-micro_batch_size // unit) * unit
        while rows % micro:
            micro += unit
        return g, (micro if micro < rows else None)
    return 0, (micro_batch_size if micro_batch_size < rows else None)


def group_batch(batch: Mapping[str, Any], group_size: int) -> Batch:
    """A "split"-layout batch of B = bp x G rows (host arrays) -> the grouped batch (module docstring).

    Raises ValueError naming the problem when the batch is not in the split layout (every completion
    starting right after P prompt slots) or when a group's rows differ in their prompt tokens or mask.
    Entries other than the batch's own and GRPO's (advantages, old_logp, ref_logp) are refused, so no
    per-row input is silently dropped.
    """
    G = int(group_size)
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch["attention_mask"])
    cmask = np.asarray(batch["completion_mask"])
    start = np.asarray(batch["completion_start"])
    B, T = ids.shape
    C = cmask.shape[1]
    P = T - C
    if G < 1 or B % G:
        raise ValueError(f"shared prompts: batch of {B} rows is not a whole number of groups of {G}")
    unknown = sorted(set(batch) - {"input_ids", "attention_mask", "completion_start", *_ROW_KEYS})
    if unknown:
        raise ValueError(f"shared prompts: batch entries {unknown} have no grouped form")
    if not (start == P).all():
        bad = np.flatnonzero(start != P)[:5].tolist()
        raise ValueError(
            f"shared prompts need the 'split' layout (completions start at slot {P} = T - C); rows {bad} "
            f"start at {start[bad].tolist()}"
        )
    if not mask[:, P - 1].all():
        bad = np.flatnonzero(mask[:, P - 1] == 0)[:5].tolist()
        raise ValueError(f"shared prompts need left-padded prompts (rows {bad} end with padding)")
    bp = B // G
    p_ids = np.where(mask[:, :P] > 0, ids[:, :P], 0).reshape(bp, G, P)
    p_mask = mask[:, :P].reshape(bp, G, P)
    differs = (p_ids != p_ids[:, :1]).any(axis=(1, 2)) | (p_mask != p_mask[:, :1]).any(axis=(1, 2))
    if differs.any():
        g = int(np.flatnonzero(differs)[0])
        raise ValueError(
            f"shared prompts: the rows of group {g} (rows {g * G}..{g * G + G - 1}) do not all have the same "
            f"prompt; rows must be ordered group by group with group size {G}"
        )
    out: Batch = dict(
        prompt_ids=ids[::G, :P].astype(np.int32),
        prompt_mask=mask[::G, :P].astype(np.int32),
        completion_ids=ids[:, P:].reshape(bp, G, C).astype(np.int32),
    )
    for key in _ROW_KEYS:
        if key in batch:
            value = np.asarray(batch[key])
            out[key] = value.reshape(bp, G, *value.shape[1:])
    return out


def flat_rows(gbatch: Mapping[str, Any]) -> Batch:
    """The per-row entries of a grouped batch with [bp, G, ...] merged into rows [bp * G, ...]."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in gbatch.items() if k in _ROW_KEYS}


def completion_hidden(config: ModelConfig, params: Any, gbatch: Mapping[str, jax.Array], *, fuse: bool = True,
                      execution: platform.ExecutionConfig | None = None,
                      with_router: bool = False) -> tuple[jax.Array, ...]:
    """The hidden states that predict each completion token of a grouped batch, run through the decoder
    with `attention.grouped_prompt`: (hidden [bp * G, C, E], targets [bp * G, C], completion mask
    [bp * G, C]), rows group by group as in the plain batch the grouped one was made from; with
    `with_router` also the router statistics of the real tokens (each prompt counted once)."""
    p_ids, p_mask = gbatch["prompt_ids"], gbatch["prompt_mask"]
    c_ids, c_mask = gbatch["completion_ids"], gbatch["completion_mask"]
    bp, G, C = c_ids.shape
    P = p_ids.shape[1]
    p_pos = decoder.positions_from_mask(p_mask)  # [bp, P]
    n_prompt = jnp.sum(p_mask.astype(jnp.int32), axis=1)  # [bp]
    c_pos = jnp.broadcast_to(n_prompt[:, None, None] + jnp.arange(C, dtype=jnp.int32), (bp, G, C))
    positions = jnp.concatenate([p_pos, c_pos.reshape(bp, G * C)], axis=1)
    ids = jnp.concatenate([p_ids, c_ids.reshape(bp, G * C)], axis=1)
    execution = execution if execution is not None else platform.default_execution(config)
    attend = attention.grouped_prompt(p_mask, c_mask, execution.attention)
    token_mask = jnp.concatenate([p_mask, c_mask.reshape(bp, G * C)], axis=1)
    hidden, _, stats = decoder.hidden_states(config, params, ids, positions, attend, weights=ParamWeights(config, fuse),
                                             execution=execution, token_mask=token_mask, with_router=True)
    E = hidden.shape[-1]
    # completion token 0 is predicted by the prompt's last slot, token j > 0 by completion token j - 1
    first = jnp.broadcast_to(hidden[:, P - 1][:, None, None, :], (bp, G, 1, E))
    rest = hidden[:, P:].reshape(bp, G, C, E)[:, :, : C - 1]
    h = jnp.concatenate([first, rest], axis=2).reshape(bp * G, C, E)
    out = (h, c_ids.reshape(bp * G, C), c_mask.reshape(bp * G, C))
    return (*out, stats) if with_router else out
