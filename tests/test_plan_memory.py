"""The plan's compiled memory figures: the GRPO update compiled from abstract shapes is the program a real
step runs, its figures respond to remat and batch size, and the remat choice follows the budget."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

from rwml_jax import platform
from rwml_jax import sharding as sh
from rwml_jax.models import decoder
from rwml_jax.models.config import ModelConfig
from rwml_jax.rl.batch import pack, with_grpo_fields
from rwml_jax.rl.memory import batch_shapes, choose_remat, compiled_update_memory, fitting_policy
from rwml_jax.rl.train_state import OptimizerConfig, create_train_state, make_optimizer
from rwml_jax.rl.update import GRPOConfig, make_grpo_step

CFG = ModelConfig(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=True)
OPT = make_optimizer(OptimizerConfig(learning_rate=1e-3))


@pytest.fixture(scope="module")
def mesh():
    return sh.make_mesh()


def scan(remat="none"):
    return platform.resolve(CFG, remat=remat, layer_loop="scan")


@pytest.mark.parametrize("group", [0, 4])
def test_abstract_compile_is_the_real_steps_program(mesh, group):
    """The same memory figures as the executable a real step compiles for real arrays (so the abstract
    batch, state and shardings are the real ones), with and without shared prompts."""
    grpo = GRPOConfig(kl_coef=0.04, micro_batch_size=4, prompt_group_size=group)
    want = compiled_update_memory(CFG, grpo, OPT, mesh, rows=8, prompt_len=24, completion_len=8, execution=scan())

    step = make_grpo_step(CFG, grpo, OPT, mesh, execution=scan())
    params = decoder.init_params_sharded(CFG, jax.random.key(0), mesh)
    state = create_train_state(params, OPT, step.state_shardings)
    r = np.random.default_rng(0)
    prompts = [p for p in (r.integers(3, 500, 24).tolist() for _ in range(2)) for _ in range(4)]
    batch = with_grpo_fields(pack(prompts, [r.integers(3, 500, 8).tolist() for _ in range(8)], prompt_len=24,
                                  completion_len=8), r.normal(size=8), np.zeros((8, 8), np.float32))
    prepared = step.prepare_batch(batch)
    assert {k: (v.shape, v.dtype) for k, v in prepared.items()} == \
        {k: (v.shape, v.dtype) for k, v in batch_shapes(step, 8, 24, 8).items()}
    got = step.lower(state, prepared, params).compile().memory_analysis()
    assert (got.argument_size_in_bytes, got.temp_size_in_bytes, got.output_size_in_bytes, got.alias_size_in_bytes) == \
        (want.arguments, want.temporaries, want.outputs, want.aliased)
    assert want.aliased > 0  # the donated state


def test_figures_follow_remat_and_batch_and_choose_within_budget(mesh):
    grpo = GRPOConfig(kl_coef=0.0)
    kw = dict(prompt_len=192, completion_len=64, execution=scan())
    best, reports = choose_remat(CFG, grpo, OPT, mesh, rows=8, budget_bytes=2**40, **kw)
    by = {r.remat: r for r in reports}
    assert best == "none"
    assert by["full"].temporaries < by["dots"].temporaries < by["none"].temporaries
    assert by["none"].arguments == by["full"].arguments  # same state and batch
    # a budget between the policies' peaks picks the least recomputation that fits; below all, none
    assert fitting_policy(reports, (by["full"].peak + by["dots"].peak) // 2) == "full"
    assert fitting_policy(reports, by["dots"].peak) == "dots"
    assert fitting_policy(reports, by["full"].peak - 1) is None
    double = compiled_update_memory(CFG, grpo, OPT, mesh, rows=16, **kw)
    assert double.temporaries > 1.5 * by["none"].temporaries


@pytest.mark.slow  # ~30 s idle: a fresh process compiling three programs
def test_plan_prints_compiled_memory():
    out = subprocess.run(
        [sys.executable, "-m", "rwml_jax.cli", "plan", "demo_cpu", "--memory", "--memory-budget", "64",
         "--config.rwml.batch_prompts=2", "--config.rwml.micro_batch_size=16", "--config.rwml.max_prompt_tokens=64", "--config.rwml.max_new_tokens=16"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Compiled rwml update (16 sequences of 64 + 16 tokens" in out.stdout
    for remat in ("none", "dots", "full"):
        assert f"remat {remat:<5} peak" in out.stdout
    assert "fits 64.00 GiB per device: remat 'none'" in out.stdout
