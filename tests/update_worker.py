"""Runs GRPO / SFT updates on a given mesh and saves the resulting parameters (used by test_update.py
and test_multihost.py in subprocesses, because the CPU device count is fixed at JAX start-up).

    python tests/update_worker.py --devices 8 --out res.npz --scenarios grpo_8dev grpo_1dev ...
    python tests/update_worker.py --devices 4 --out res.npz --scenarios grpo_8dev \
        --coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0
"""

from __future__ import annotations

import argparse
import os
import sys

SGD_SCALE = 1000.0  # large, so (p_init - p_new) / SGD_SCALE recovers the gradient to float32 precision


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True, help="CPU devices of this process")
    ap.add_argument("--out", required=True, help="npz file for the results (multi-process: one per process, NAME.pI.npz)")
    ap.add_argument("--scenarios", nargs="+", required=True, help="names from SCENARIOS")
    ap.add_argument("--coordinator", default=None, help="host:port of the jax.distributed coordinator")
    ap.add_argument("--num-processes", type=int, default=1, help="processes in the multi-process run")
    ap.add_argument("--process-id", type=int, default=0, help="this process's index")
    args = ap.parse_args()
    # Unoptimised LLVM code generation: the models are tiny, and compiling dominates the run time.
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                               "--xla_backend_optimization_level=0")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import numpy as np

    from rwml_jax import sharding as sh

    if args.coordinator:
        multi = sh.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        assert multi and jax.process_count() == args.num_processes

    import optax

    from rwml_jax.models import decoder
    from rwml_jax.models.config import ModelConfig
    from rwml_jax.rl import batch as bt
    from rwml_jax.rl import grpo
    from rwml_jax.rl.sft import SFTConfig, make_sft_step
    from rwml_jax.rl.train_state import OptimizerConfig, create_train_state, make_optimizer
    from rwml_jax.rl.update import GRPOConfig, make_grpo_step

    cfg = ModelConfig(
        model_type="qwen3", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True, tie_word_embeddings=True,
        rope_theta=1e6,
    )
    rng = np.random.default_rng(0)

    def random_params(scale: float) -> dict:
        """Host-side random parameters (kernels N(0, scale), norm scales 1 + N(0, 0.1))."""
        def leaf(path, s):
            name = jax.tree_util.keystr(path)
            if "norm" in name:
                return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
            return (scale * rng.standard_normal(s.shape)).astype(np.float32)

        return jax.tree_util.tree_map_with_path(leaf, decoder.param_shapes(cfg))

    host_params = random_params(0.1)
    host_ref = jax.tree.map(lambda p: (p + 0.01 * rng.standard_normal(p.shape)).astype(np.float32), host_params)

    B, G, P, C = 16, 4, 6, 5
    prompts = [rng.integers(1, 96, rng.integers(2, P + 1)).tolist() for _ in range(B)]
    comps = [rng.integers(1, 96, rng.integers(1, C + 1)).tolist() for _ in range(B)]
    rewards = rng.integers(0, 2, B).astype(np.float32)
    base = bt.pack(prompts, comps, prompt_len=P, completion_len=C)
    old_logp = np.log(rng.uniform(0.005, 0.05, (B, C)))  # off-policy: ratios far from 1 get clipped
    grpo_batch = bt.with_grpo_fields(base, np.asarray(grpo.group_advantages(rewards, G)), old_logp)
    # GRPO groups of 2 rows sharing their prompt (8 groups), for prompt_group_size = 2
    GS = 2
    shared_prompts = [p for p in prompts[::GS] for _ in range(GS)]
    shared_batch = bt.with_grpo_fields(bt.pack(shared_prompts, comps, prompt_len=P, completion_len=C),
                                       np.asarray(grpo.group_advantages(rewards, GS)), old_logp)

    # "sgd": one step of p - SGD_SCALE * grad, from which the test recovers the gradient exactly;
    # "adamw": three AdamW steps with warm-up, cosine schedule, weight decay and clipping.
    opt_cfg = OptimizerConfig(learning_rate=1e-4, warmup_steps=2, schedule="cosine", total_steps=10,
                              weight_decay=0.01, max_grad_norm=1.0)
    optimizers = {"sgd": (optax.sgd(SGD_SCALE), 1), "adamw": (make_optimizer(opt_cfg), 3)}

    def mesh_for(name: str):
        if name.endswith("1dev"):
            return sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        return sh.make_mesh(2, 2, 2)

    def place(tree, shardings):
        return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), tree, shardings)

    # name -> (kind, optimizer, options)
    scenarios = {
        "grpo_1dev": ("grpo", "sgd", dict(kl_coef=0.05)),
        "grpo_8dev": ("grpo", "sgd", dict(kl_coef=0.05)),
        "grpo_micro_8dev": ("grpo", "sgd", dict(kl_coef=0.05, micro_batch_size=8)),
        "seqsum_1dev": ("grpo", "sgd", dict(loss_agg="seq-mean-token-sum")),
        "seqsum_micro_8dev": ("grpo", "sgd", dict(loss_agg="seq-mean-token-sum", micro_batch_size=8, logits_chunk=1)),
        "sft_1dev": ("sft", "sgd", dict()),
        "sft_micro_8dev": ("sft", "sgd", dict(micro_batch_size=8)),
        "shared_flat_1dev": ("shared", "sgd", dict(kl_coef=0.05)),
        "shared_1dev": ("shared", "sgd", dict(kl_coef=0.05, prompt_group_size=GS)),
        "shared_micro_8dev": ("shared", "sgd", dict(kl_coef=0.05, prompt_group_size=GS, micro_batch_size=8)),
        "adamw_1dev": ("grpo", "adamw", dict(kl_coef=0.1, kl_estimator="k1", loss_agg="seq-mean-token-mean")),
        "adamw_micro_8dev": ("grpo", "adamw", dict(kl_coef=0.1, kl_estimator="k1", loss_agg="seq-mean-token-mean",
                                                   micro_batch_size=4)),
    }
    results: dict[str, np.ndarray] = {}
    for name, leaf in jax.tree_util.tree_flatten_with_path(host_params)[0]:
        results[f"init/{jax.tree_util.keystr(name)}"] = leaf
    for name in args.scenarios:
        kind, opt_name, opts = scenarios[name]
        optimizer, n_steps = optimizers[opt_name]
        mesh = mesh_for(name)
        if kind in ("grpo", "shared"):
            step = make_grpo_step(cfg, GRPOConfig(**opts), optimizer, mesh)
            data = grpo_batch if kind == "grpo" else shared_batch
        else:
            step = make_sft_step(cfg, SFTConfig(**opts), optimizer, mesh)
            data = base
        params = place(host_params, step.param_shardings)
        ref = place(host_ref, step.param_shardings) if step.uses_reference else None
        state = create_train_state(params, optimizer, step.state_shardings)
        losses = []
        for _ in range(n_steps):
            state, metrics = step(state, data, ref)
            losses.append(float(np.asarray(metrics["loss"])))
        flat = jax.tree_util.tree_flatten_with_path(sh.to_host(state.params))[0]
        for path, leaf in flat:
            results[f"{name}/{jax.tree_util.keystr(path)}"] = leaf
        results[f"{name}:losses"] = np.asarray(losses)
        results[f"{name}:step"] = np.asarray(sh.to_host(state.step))
        results[f"{name}:processes"] = np.asarray(jax.process_count())
        if "clip_frac" in metrics:
            results[f"{name}:clip_frac"] = np.asarray(metrics["clip_frac"])
    out = args.out
    if jax.process_count() > 1:  # every process saves what it gathered: res.npz -> res.p0.npz, res.p1.npz
        out = out[:-len(".npz")] + f".p{jax.process_index()}.npz" if out.endswith(".npz") else f"{out}.p{jax.process_index()}"
    np.savez(out, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
