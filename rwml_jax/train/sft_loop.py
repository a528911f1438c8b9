"""Supervised fine-tuning on (prompt ids, completion ids) pairs: warm start, filter model π', WM-SFT.

Loss on completion tokens only (`rwml_jax.rl.sft`), resumable through `TrainLoop`. Batches are packed
right-aligned (prompt and completion contiguous) into one shape per stage (the longest prompt rounded up
to 64 plus the longest completion rounded up to 16), so a stage compiles its step once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rwml_jax.rl.batch import pack
from rwml_jax.sharding import batch_size_multiple
from rwml_jax.rl.sft import SFTConfig, make_sft_step
from rwml_jax.rl.train_state import OptimizerConfig
from rwml_jax.train.encode import round_up
from rwml_jax.train.loop import TrainLoop, host_scalars, num_steps
from rwml_jax.train.metrics_log import MetricsLogger, progress

log = logging.getLogger(__name__)

Example = tuple[Sequence[int], Sequence[int]]  # (prompt ids, completion ids)


def train_sft(
    *,
    stage_dir: Path,
    mesh: Any,
    model_config: Any,
    init_params: Callable[[], Any],
    examples: Sequence[Example],
    learning_rate: float,
    epochs: int,
    batch_size: int,
    micro_batch_size: int | None,
    warmup_steps: int,
    seed: int,
    pad_id: int,
    max_steps: int = -1,
    optimizer: Any = None,
    checkpoint_every: int = 50,
    keep: int = 2,
    logger: MetricsLogger | None = None,
    desc: str = "sft",
    on_step: Callable[[int, Any], None] | None = None,
    execution: Any = None,
    schedule: str = "constant",
) -> tuple[Any, dict[str, float]]:
    """Train and return (final params, last metrics). `optimizer`: the config's optimizer section;
    `execution`: a `platform.ExecutionConfig` (default: the platform's rules); `schedule`: the learning
    rate after warm-up, constant or decaying to 0 over the run (cosine | linear)."""
    total = num_steps(len(examples), batch_size, epochs, max_steps)
    opt = OptimizerConfig(
        learning_rate=learning_rate, warmup_steps=warmup_steps, weight_decay=0.0, max_grad_norm=1.0,
        schedule=schedule, total_steps=total,
        **({} if optimizer is None else dict(b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps,
                                                   state_dtype=optimizer.state_dtype)),
    )
    loop = TrainLoop(stage_dir, mesh, model_config, opt, len(examples), batch_size, total, seed,
                     every_steps=checkpoint_every, keep=keep)
    mb = micro_batch_size if micro_batch_size and micro_batch_size < batch_size else None
    step_fn = make_sft_step(model_config, SFTConfig(micro_batch_size=mb), loop.optimizer, mesh, execution=execution)
    state, cursor, first = loop.start(init_params)
    # One padded shape for the whole stage: on CPU a recompile costs more than the padding.
    p_len = round_up(max(len(p) for p, _ in examples), 64)
    c_len = round_up(max(len(c) for _, c in examples), 16)
    # rows are prompt + completion back to back: the longest row, not the longest prompt + the longest completion
    seq_len = min(p_len + c_len, round_up(max(len(p) + len(c) for p, c in examples), 64))
    metrics: dict[str, float] = {}
    bar = progress(total, desc, initial=first)
    try:
        for step, idx, _key in loop.steps(cursor, first):
            t0 = time.perf_counter()
            prompts = [examples[i][0] for i in idx]
            comps = [examples[i][1] for i in idx]
            batch = pack(prompts, comps, prompt_len=p_len, completion_len=c_len, layout="right", pad_id=pad_id,
                         seq_len=seq_len)
            state, m = step_fn(state, batch)
            metrics = host_scalars(m)
            metrics["step_time_s"] = time.perf_counter() - t0
            metrics["tokens_per_s"] = metrics.get("tokens", 0.0) / max(metrics["step_time_s"], 1e-9)
            if logger is not None:
                logger.scalars(step + 1, metrics, prefix=f"{desc}/")
            if on_step is not None:
                on_step(step + 1, state)
            loop.maybe_save(step + 1, state, cursor, force=step + 1 == total)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
    finally:
        bar.close()
        loop.close()
    return state.params, metrics


def fit_batch(requested: int, num_examples: int, mesh: Any) -> int:
    """The SFT batch for a data set: `requested`, or all `num_examples` when fewer, rounded down to a
    multiple of the data x fsdp device count (unchanged on one device)."""
    multiple = batch_size_multiple(mesh)
    batch = min(requested, num_examples)
    if batch < multiple:
        raise ValueError(f"{num_examples} SFT examples cannot fill one batch of data x fsdp = {multiple} devices")
    return batch - batch % multiple


def truncate_example(prompt: Sequence[int], completion: Sequence[int], max_len: int) -> Example:
    """Fit prompt + completion into `max_len` tokens, cutting the prompt's oldest tokens first."""
    completion = list(completion)[: max_len // 2] if len(completion) > max_len // 2 else list(completion)
    keep = max_len - len(completion)
    return list(prompt)[-keep:], completion


def examples_stats(examples: Sequence[Example]) -> dict[str, float]:
    lens = np.array([len(p) + len(c) for p, c in examples]) if examples else np.zeros(1)
    return {"examples": len(examples), "mean_tokens": float(lens.mean()), "max_tokens": int(lens.max())}
