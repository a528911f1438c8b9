"""What the compiled GRPO update needs in device memory, from the compiler itself.

`compiled_update_memory` lowers and compiles the update step (`rwml_jax.rl.update.make_grpo_step`) for
abstract shapes on a mesh (no parameters are created, nothing runs) and reads XLA's buffer assignment
(`compiled.memory_analysis()`), per device. `choose_remat` compiles it under each remat policy and picks
the cheapest in recomputation that fits a memory budget. `rwml-jax plan --memory` prints both for a
recipe's paper shapes; on the target machine (a TPU host, a GPU) the figures are the target's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from rwml_jax import platform
from rwml_jax.models import decoder
from rwml_jax.models.config import ModelConfig
from rwml_jax.rl.batch import pack, with_grpo_fields
from rwml_jax.rl.shared_prompt import group_batch
from rwml_jax.rl.train_state import create_train_state
from rwml_jax.rl.update import GRPOConfig, make_grpo_step

REMAT_ORDER = ("none", "dots", "full")  # least recomputation first


@dataclasses.dataclass(frozen=True)
class UpdateMemory:
    """Bytes per device of one compiled update: its arguments (state, batch, reference parameters), its
    temporaries (activations, gradients, optimizer intermediates) and its outputs, less what the donated
    state aliases."""

    remat: str
    arguments: int
    temporaries: int
    outputs: int
    aliased: int

    @property
    def peak(self) -> int:
        return self.arguments + self.temporaries + self.outputs - self.aliased


def batch_shapes(step: Any, rows: int, prompt_len: int, completion_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract batch `step` (an `UpdateStep`) compiles for: `rows` sequences of prompt_len +
    completion_len tokens with GRPO's fields, grouped when the step shares prompts (`rl.shared_prompt`)."""
    G = max(step.group, 1)
    prompts = [[1] * prompt_len for _ in range(rows // G) for _ in range(G)]
    example = with_grpo_fields(pack(prompts, [[1] * completion_len] * rows, prompt_len=prompt_len,
                                    completion_len=completion_len),
                               np.zeros(rows, np.float32), np.zeros((rows, completion_len), np.float32))
    if G > 1:
        example = group_batch(example, G)
    return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=step.batch_sharding)
            for k, v in example.items()}


def compiled_update_memory(model_config: ModelConfig, grpo_config: GRPOConfig, optimizer: optax.GradientTransformation,
                           mesh: Mesh, *, rows: int, prompt_len: int, completion_len: int,
                           execution: platform.ExecutionConfig) -> UpdateMemory:
    """Compile the GRPO update for a batch of `rows` sequences of prompt_len + completion_len tokens and
    read its memory per device."""
    step = make_grpo_step(model_config, grpo_config, optimizer, mesh, execution=execution)
    params = jax.eval_shape(lambda: decoder.init_params(model_config, jax.random.key(0)))
    state = jax.eval_shape(lambda p: create_train_state(p, optimizer), params)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, step.state_shardings)
    ref = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, step.param_shardings)
    m = step.lower(state, batch_shapes(step, rows, prompt_len, completion_len), ref).compile().memory_analysis()
    return UpdateMemory(execution.remat, int(m.argument_size_in_bytes), int(m.temp_size_in_bytes),
                        int(m.output_size_in_bytes), int(m.alias_size_in_bytes))


def fitting_policy(reports: Sequence[UpdateMemory], budget_bytes: int) -> str | None:
    """The first report's remat policy (least recomputation first) whose peak fits `budget_bytes`, or None."""
    return next((r.remat for r in reports if r.peak <= budget_bytes), None)


def choose_remat(model_config: ModelConfig, grpo_config: GRPOConfig, optimizer: optax.GradientTransformation,
                 mesh: Mesh, *, rows: int, prompt_len: int, completion_len: int, budget_bytes: int,
                 execution: platform.ExecutionConfig,
                 policies: Sequence[str] = REMAT_ORDER) -> tuple[str | None, list[UpdateMemory]]:
    """The first of `policies` (least recomputation first) whose compiled update fits `budget_bytes` per
    device (None if none fits), and every policy's figures."""
    reports = [compiled_update_memory(model_config, grpo_config, optimizer, mesh, rows=rows, prompt_len=prompt_len,
                                      completion_len=completion_len,
                                      execution=dataclasses.replace(execution, remat=policy))
               for policy in policies]
    return fitting_policy(reports, budget_bytes), reports
