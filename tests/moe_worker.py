"""Runs a tiny Qwen3-MoE forward and one SGD GRPO step on a given mesh and saves logits and updated parameters
(used by test_moe.py in a subprocess, because the CPU device count is fixed at JAX start-up).

    python tests/moe_worker.py --out res.npz --meshes 1dev expert8 expert4_fsdp2 expert2_fsdp2_tensor2
"""

from __future__ import annotations

import argparse
import os
import sys

SGD_SCALE = 1000.0  # (p_init - p_new) / SGD_SCALE recovers the gradient to float32 precision

# name -> (data, fsdp, expert, tensor)
MESHES = {"1dev": (1, 1, 1, 1), "expert8": (1, 1, 8, 1), "expert4_fsdp2": (1, 2, 4, 1),
          "expert2_fsdp2_tensor2": (1, 2, 2, 2), "data2_expert4": (2, 1, 4, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--meshes", nargs="+", required=True, help="names from MESHES")
    ap.add_argument("--hf-dir", default=None, help="also load this HF MoE folder straight into the "
                    "expert2_fsdp2_tensor2 mesh and save its logits on a fixed batch")
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.dirname(here), here]

    import jax
    import numpy as np
    import optax

    from rwml_jax import sharding as sh
    from rwml_jax.models import decoder
    from rwml_jax.models.config import ModelConfig
    from rwml_jax.rl import batch as bt
    from rwml_jax.rl import grpo
    from rwml_jax.rl.train_state import create_train_state
    from rwml_jax.rl.update import GRPOConfig, make_grpo_step

    # dense layer 1 between sparse layers 0 and 2; 8 experts, top-2 renormalised; untied head
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=(1,))
    rng = np.random.default_rng(0)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        return ((0.5 if "router" in name else 0.1) * rng.standard_normal(s.shape)).astype(np.float32)

    host_params = jax.tree_util.tree_map_with_path(leaf, decoder.param_shapes(cfg))
    B, G, P, C = 16, 4, 6, 5
    prompts = [rng.integers(1, 64, rng.integers(2, P + 1)).tolist() for _ in range(B)]
    comps = [rng.integers(1, 64, rng.integers(1, C + 1)).tolist() for _ in range(B)]
    base = bt.pack(prompts, comps, prompt_len=P, completion_len=C)
    old_logp = np.log(rng.uniform(0.005, 0.05, (B, C)))
    batch = bt.with_grpo_fields(base, np.asarray(grpo.group_advantages(rng.normal(size=B).astype(np.float32), G)),
                                old_logp)

    results: dict[str, np.ndarray] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(host_params)[0]:
        results[f"init/{jax.tree_util.keystr(path)}"] = x
    for name in args.meshes:
        d, f, e, t = MESHES[name]
        devices = jax.devices()[: d * f * e * t]
        mesh = sh.make_mesh(d, f, t, devices=devices, expert=e)
        step = make_grpo_step(cfg, GRPOConfig(router_aux_loss_coef=0.1, micro_batch_size=8), optax.sgd(SGD_SCALE),
                              mesh)
        params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i, x=x: x[i]),
                              host_params, step.param_shardings)
        if e > 1:  # the experts really are split over the expert axis
            spec = params["layers"]["moe"]["gate_kernel"].sharding.spec
            assert spec[1] == "expert", spec

        def fwd(p, ids, mask, mesh=mesh):
            with sh.tracing_context(mesh):
                return decoder.apply(cfg, p, ids, mask, with_router=True)[::2]

        logits, stats = jax.jit(fwd)(params, *sh.shard_batch([base["input_ids"], base["attention_mask"]], mesh))
        results[f"{name}:logits"] = np.asarray(sh.to_host(logits))
        results[f"{name}:counts"] = np.asarray(sh.to_host(stats["counts"]))
        state = create_train_state(params, optax.sgd(SGD_SCALE), step.state_shardings)
        state, metrics = step(state, batch)
        results[f"{name}:loss"] = np.asarray(float(metrics["loss"]))
        for path, x in jax.tree_util.tree_flatten_with_path(sh.to_host(state.params))[0]:
            results[f"{name}/{jax.tree_util.keystr(path)}"] = x
    if args.hf_dir:
        from hf_fixtures import padded_batch

        from rwml_jax import models

        mesh = sh.make_mesh(1, 2, 2, expert=2)
        config, params = models.load_pretrained(args.hf_dir, mesh=mesh)
        gate = params["layers"]["moe"]["gate_kernel"]  # [Ls, X, E, Fm] over (-, expert, fsdp, tensor)
        Ls, X, E, Fm = gate.shape
        assert gate.addressable_shards[0].data.shape == (Ls, X // 2, E // 2, Fm // 2), gate.sharding
        ids, mask = padded_batch(config.vocab_size, [9, 4, 6, 2], left=True)

        def fwd(p, ids, mask):
            with sh.tracing_context(mesh):
                return models.forward(config, p, ids, mask)

        results["loaded:logits"] = np.asarray(sh.to_host(jax.jit(fwd)(params, ids, mask)))
    np.savez(args.out, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
