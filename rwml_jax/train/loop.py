"""The resumable optimiser loop every training stage shares (warm start, filter SFT, RWML, WM-SFT).

A stage owns a `TrainLoop`: it restores the newest checkpoint of the stage (train state, data cursor,
base RNG key) or builds a fresh state, hands out the example indices of each step from the `DataCursor`
(the order is a pure function of seed and epoch), derives each step's RNG as `fold_in(base, step)`, and
saves every `every_steps` steps and at the end. A run killed at any moment resumes at the last saved
step with the same data order and the same random stream, so it ends with the same number of steps and
the same visited batches as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwml_jax.models import decoder
from rwml_jax.rl.train_state import (
    OptimizerConfig,
    TrainState,
    create_train_state,
    make_optimizer,
    state_shardings,
)
from rwml_jax.train.checkpoint import Checkpointer, DataCursor
from rwml_jax.train.stage_io import append_jsonl, read_jsonl, write_jsonl
from rwml_jax.train.writers import flush_pending

log = logging.getLogger(__name__)


def num_steps(num_examples: int, batch_size: int, epochs: int, max_steps: int = -1) -> int:
    """Optimiser steps for `epochs` passes (whole batches only), capped by `max_steps` when >= 0."""
    if num_examples < batch_size:
        raise ValueError(f"{num_examples} training examples cannot fill one batch of {batch_size}")
    steps = epochs * (num_examples // batch_size)
    return steps if max_steps < 0 else min(steps, max_steps)


@dataclasses.dataclass
class TrainLoop:
    """Checkpointed steps over `num_examples` examples in batches of `batch_size`.

    The visited example indices of every step are appended to `<stage>/batches.jsonl`, which is how the
    resume test proves the data order is the one of an uninterrupted run.
    """

    stage_dir: Path
    mesh: Any
    model_config: Any
    optimizer_config: OptimizerConfig
    num_examples: int
    batch_size: int
    total_steps: int
    seed: int
    every_steps: int = 50
    keep: int = 2
    shuffle: bool = True

    def __post_init__(self) -> None:
        self.optimizer = make_optimizer(self.optimizer_config)
        self.param_shardings = decoder.param_shardings(self.model_config, self.mesh)
        self.shardings = state_shardings(self.optimizer, self.param_shardings, self.mesh)
        self.ckpt = Checkpointer(self.stage_dir / "checkpoints", keep=self.keep)
        self.batches_file = self.stage_dir / "batches.jsonl"

    def start(self, init_params: Callable[[], Any]) -> tuple[TrainState, DataCursor, int]:
        """(state, cursor, first step): restored from the newest checkpoint, or fresh from `init_params()`.

        On resume, `batches.jsonl` is cut back to the restored step so it stays a faithful record.
        """
        step = self.ckpt.latest_step()
        if step is None:
            state = create_train_state(init_params(), self.optimizer, self.shardings)
            self._truncate_batches(0)
            return state, DataCursor(seed=self.seed), 0
        abstract = jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            jax.eval_shape(lambda: create_train_state(init_params(), self.optimizer)),
            self.shardings,
        )
        restored, extra = self.ckpt.restore(step, target_abstract={"train": abstract})
        cursor = DataCursor.from_dict(extra["cursor"])
        log.info("resumed %s at step %d (epoch %d, position %d)", self.stage_dir.name, step, cursor.epoch, cursor.position)
        self._truncate_batches(step)
        return restored["train"], cursor, step

    def steps(self, cursor: DataCursor, first_step: int) -> Iterator[tuple[int, np.ndarray, jax.Array]]:
        """Yield (step, example indices [batch_size], step RNG key) from `first_step` to `total_steps`."""
        base = jax.random.key(self.seed)
        for step in range(first_step, self.total_steps):
            idx = cursor.next_batch(self.num_examples, self.batch_size, shuffle=self.shuffle)
            append_jsonl(self.batches_file, [{"step": step, "indices": idx.tolist()}], fsync=False)
            yield step, idx, jax.random.fold_in(base, step)

    def maybe_save(self, step_done: int, state: TrainState, cursor: DataCursor, *, force: bool = False,
                   extra: dict[str, Any] | None = None) -> None:
        """Save after `step_done` optimiser steps every `every_steps` steps (or when `force`)."""
        if force or (self.every_steps > 0 and step_done % self.every_steps == 0):
            if self.ckpt.latest_step() == step_done:
                return
            flush_pending()  # logs in a bucket: every record up to this step is written before the checkpoint
            self.ckpt.save(step_done, {"train": state}, extra=dict(extra or {}), cursor=cursor)

    def close(self) -> None:
        self.ckpt.wait()
        self.ckpt.close()

    def _truncate_batches(self, step: int) -> None:
        if self.batches_file.exists():
            write_jsonl(self.batches_file, [r for r in read_jsonl(self.batches_file) if r["step"] < step])


def host_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Device metrics -> Python floats (one host sync per logged step)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def copy_params(params: Any) -> Any:
    """A device copy (e.g. the frozen reference) that survives donation of the original."""
    return jax.tree.map(jnp.copy, params)
