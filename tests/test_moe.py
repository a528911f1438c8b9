"""Qwen3-MoE: parity with `transformers.Qwen3MoeForCausalLM`, expert sharding, weights I/O and training."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import MOE_VARIANTS, build_hf_model, padded_batch, rel_err, torch_logits
from rwml_jax import models
from rwml_jax.models import decoder, moe
from rwml_jax.models.config import ModelConfig, UnsupportedModelError

LENGTHS = [11, 4, 9, 1]
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", params=sorted(MOE_VARIANTS))
def hf_moe(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    return request.param, path, build_hf_model(request.param, path)


def test_config_reads_the_moe_fields(hf_moe):
    name, path, torch_model = hf_moe
    config = ModelConfig.from_pretrained(path)
    hf = torch_model.config
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (
        hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size)
    expected = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in torch_model.model.layers]
    assert list(config.sparse_layers) == expected and any(expected), name
    assert config.num_params == sum(p.numel() for p in torch_model.parameters())  # a tied head counted once


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_float32_logits_match_torch(hf_moe, left):
    name, path, torch_model = hf_moe
    config, params = models.load_pretrained(path, dtype="float32")
    ids, mask = padded_batch(config.vocab_size, LENGTHS, left=left)
    ours = np.asarray(models.forward(config, params, ids, mask))
    ref = torch_logits(torch_model, ids, mask)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref, mask) < 1e-4, name


def test_unsupported_fields_are_refused(tmp_path):
    base = dict(model_type="qwen3_moe", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=8)
    assert ModelConfig.from_hf_dict(base).is_moe
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        ModelConfig.from_hf_dict(dict(base, use_sliding_window=True))
    with pytest.raises(UnsupportedModelError, match="dropout"):
        ModelConfig.from_hf_dict(dict(base, attention_dropout=0.1))
    with pytest.raises(UnsupportedModelError, match="silu"):
        ModelConfig.from_hf_dict(dict(base, hidden_act="gelu"))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_hf_dict(dict(base, num_experts_per_tok=5))
    with pytest.raises(ValueError, match="mlp_only_layers"):
        ModelConfig.from_hf_dict(dict(base, mlp_only_layers=[2]))


def test_experts_are_dropless_and_ragged_matches_dense():
    """The grouped matmul equals looping over every expert densely, whatever the routing imbalance."""
    rng = np.random.default_rng(0)
    N, E, F, X, k = 13, 8, 6, 5, 2
    h = jnp.asarray(rng.normal(size=(N, E)), jnp.float32)
    gate, up = (jnp.asarray(rng.normal(size=(X, E, F)), jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.normal(size=(X, F, E)), jnp.float32)
    top_i = jnp.asarray(np.r_[np.zeros((9, k), int) + [0, 3], rng.integers(0, X, (4, k))], jnp.int32)  # expert 0 hot
    top_w = jnp.asarray(rng.random((N, k)), jnp.float32)
    want = np.zeros((N, E), np.float32)
    for n in range(N):
        for j in range(k):
            e = int(top_i[n, j])
            a = jax.nn.silu(h[n] @ gate[e]) * (h[n] @ up[e])
            want[n] += float(top_w[n, j]) * np.asarray(a @ down[e])
    for impl in ("ragged", "blocked"):
        got = moe.experts_local(h, top_i, top_w, gate, up, down, impl=impl)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=impl)
        # two halves of the experts add up to the whole (what each expert shard computes)
        half = moe.experts_local(h, top_i, top_w, gate[:3], up[:3], down[:3], 0, impl) + moe.experts_local(
            h, top_i, top_w, gate[3:], up[3:], down[3:], 3, impl)
        np.testing.assert_allclose(np.asarray(half), want, rtol=1e-5, atol=1e-5, err_msg=impl)
    # and their gradients agree
    def loss(impl):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(moe.experts_local(*a, impl=impl))), argnums=(0, 2, 3, 4, 5))(
            h, top_i, top_w, gate, up, down)
    for a, b in zip(loss("ragged"), loss("blocked")):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * np.abs(np.asarray(a)).max())


def test_save_pretrained_round_trip(hf_moe, tmp_path):
    import torch
    import transformers

    name, path, torch_model = hf_moe
    config, params = models.load_pretrained(path)
    assert params["layers"]["moe"]["gate_kernel"].shape == (sum(config.sparse_layers), config.num_experts,
                                                            config.hidden_size, config.moe_intermediate_size)
    out = tmp_path / "saved"
    models.save_pretrained(config, params, out)
    assert "model.layers.{}.mlp.experts.0.gate_proj.weight".format(config.sparse_layers.index(True)) in json.dumps(
        sorted(__import__("rwml_jax.models.safetensors_io", fromlist=["x"]).SafetensorsFile(
            str(out / "model.safetensors"))))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = padded_batch(config.vocab_size, LENGTHS, left=False, seed=2)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask), torch_logits(torch_model, ids, mask), rtol=0, atol=1e-5)
    config2, params2 = models.load_pretrained(out)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", [pytest.param(v, marks=() if v == "moe-unnorm-step2-tied" else pytest.mark.slow)
                                  for v in sorted(MOE_VARIANTS)])
def test_greedy_generation_matches_transformers_generate(name, tmp_path):
    """The sampler (per-layer decode weights, KV cache, one-token steps) against transformers generate on a
    left-padded batch, in the orientation "auto" picks and one other (one variant in the fast suite)."""
    from test_sampling import _hf_greedy, _prompts

    from rwml_jax import sampling

    torch_model = build_hf_model(name, str(tmp_path))
    config, params = models.load_pretrained(tmp_path)
    prompts = _prompts(config.vocab_size)
    ref = _hf_greedy(torch_model, prompts, 8, None)
    for orientation in ("auto", "in_out"):
        out = sampling.Sampler(config, max_new_tokens=8, weight_orientation=orientation).generate(
            params, prompts, temperature=0.0, stop_at_eos=False)
        assert out.token_ids == ref, (name, orientation)


def _tiny_moe(**kw) -> ModelConfig:
    base = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True, num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=(1,),
                tie_word_embeddings=True)
    return ModelConfig(**{**base, **kw})


def test_router_stats_and_aux_loss_match_transformers(hf_moe):
    """The load-balancing loss from our router statistics equals transformers' aux_loss (padding excluded)."""
    import torch

    name, path, torch_model = hf_moe
    config, params = models.load_pretrained(path)
    ids, mask = padded_batch(config.vocab_size, LENGTHS, left=True, seed=4)
    _, _, stats = decoder.apply(config, params, jnp.asarray(ids), jnp.asarray(mask), with_router=True)
    assert float(stats["tokens"]) == mask.sum() * sum(config.sparse_layers)
    assert float(stats["counts"].sum()) == float(stats["tokens"]) * config.num_experts_per_tok
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(pos), output_router_logits=True)
    np.testing.assert_allclose(float(moe.load_balancing_loss(config, stats)), float(out.aux_loss), rtol=1e-5)


def test_grpo_and_sft_updates_on_a_moe_lower_the_loss_and_report_experts():
    """Repeated GRPO steps on one fixed batch (sampler log-probs = the initial policy's) lower its loss, with the
    load-balancing loss on; the step reports per-expert token counts of the real tokens."""
    import optax

    from rwml_jax import sharding as sh
    from rwml_jax.rl import batch as bt
    from rwml_jax.rl import grpo
    from rwml_jax.rl.sft import SFTConfig, make_sft_step
    from rwml_jax.rl.train_state import create_train_state
    from rwml_jax.rl.update import GRPOConfig, make_grpo_step, make_logprob_fn

    cfg = _tiny_moe()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 64, rng.integers(2, 6)).tolist() for _ in range(8)]
    comps = [rng.integers(1, 64, rng.integers(2, 5)).tolist() for _ in range(8)]
    packed = bt.pack(prompts, comps, prompt_len=6, completion_len=4)
    params = decoder.init_params(cfg, jax.random.PRNGKey(0))
    old_logp = np.asarray(make_logprob_fn(cfg, sh.make_mesh())(params, packed))
    batch = bt.with_grpo_fields(packed, np.asarray(grpo.group_advantages(jnp.asarray(rng.normal(size=8)), 4)), old_logp)
    optimizer = optax.adam(1e-3)
    step = make_grpo_step(cfg, GRPOConfig(router_aux_loss_coef=0.01, micro_batch_size=4), optimizer, sh.make_mesh())
    state = create_train_state(params, optimizer, step.state_shardings)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    counts = [float(metrics[f"expert_tokens/{i:03d}"]) for i in range(cfg.num_experts)]
    real = int(np.asarray(batch["attention_mask"]).sum())
    assert sum(counts) == real * sum(cfg.sparse_layers) * cfg.num_experts_per_tok
    assert float(metrics["expert_load_max"]) >= 1.0 >= float(metrics["expert_load_min"])
    assert float(metrics["router_aux_loss"]) > 0

    # the SFT update on the same model: the completions' cross-entropy falls
    sft = make_sft_step(cfg, SFTConfig(router_aux_loss_coef=0.01), optimizer, sh.make_mesh())
    state = create_train_state(decoder.init_params(cfg, jax.random.PRNGKey(1)), optimizer, sft.state_shardings)
    nll = []
    for _ in range(4):
        state, metrics = sft(state, packed)
        nll.append(float(metrics["nll"]))
    assert nll[-1] < nll[0] - 0.01 and "expert_tokens/000" in metrics, nll


# ---------------------------------------------------------------------------------------------------
# 8 forced CPU devices (subprocess: the device count is fixed when JAX starts)
# ---------------------------------------------------------------------------------------------------
SHARDED = ["expert8", "expert4_fsdp2", "expert2_fsdp2_tensor2"]


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_sharded")
    out, hf_dir = str(tmp / "res.npz"), str(tmp / "hf")
    build_hf_model("moe-mlp-only-bias", hf_dir)
    cmd = [sys.executable, os.path.join(HERE, "moe_worker.py"), "--out", out, "--meshes", "1dev", *SHARDED,
           "--hf-dir", hf_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(np.load(out), hf_dir=hf_dir)


@pytest.mark.parametrize("mesh", SHARDED)
def test_sharded_experts_give_the_same_logits_and_gradients(sharded_results, mesh):
    """Experts split over the expert axis (alone, x fsdp, x fsdp x tensor): the forward's logits and router
    counts, the GRPO loss (with the load-balancing loss) and every parameter's gradient equal one device's."""
    r = sharded_results
    np.testing.assert_allclose(r[f"{mesh}:logits"], r["1dev:logits"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(r[f"{mesh}:counts"], r["1dev:counts"])
    np.testing.assert_allclose(r[f"{mesh}:loss"], r["1dev:loss"], rtol=1e-5)
    leaves = [k[len("init/"):] for k in r if k.startswith("init/")]
    assert any("moe" in k and "gate_kernel" in k for k in leaves)
    for leaf in leaves:
        g1 = r[f"init/{leaf}"] - r[f"1dev/{leaf}"]  # = SGD_SCALE * gradient
        gn = r[f"init/{leaf}"] - r[f"{mesh}/{leaf}"]
        assert np.abs(g1).max() > 0, leaf
        np.testing.assert_allclose(gn, g1, rtol=0, atol=1e-4 * np.abs(g1).max(), err_msg=leaf)


def test_plan_memory_for_qwen3_30b_a3b_on_an_expert_mesh():
    """`rwml-jax plan` with the hub name as the recipe override: the preset's shapes (30.5B parameters, 3.35B
    active), and per-device memory with the experts split over the expert axis and the rest over fsdp."""
    from rwml_jax.config import load_config
    from rwml_jax.train.plan import describe_plan

    overrides = ["--config.model.path=Qwen/Qwen3-30B-A3B", "--config.mesh.data=1", "--config.mesh.fsdp=4",
                 "--config.mesh.expert=8"]
    config = load_config("rwml_alfworld", overrides)
    text = describe_plan(config, num_devices=32)
    cfg = ModelConfig.from_hf_dict(__import__("configs.models", fromlist=["x"]).preset("qwen3-30b-a3b"))
    assert cfg.num_experts == 128 and cfg.num_experts_per_tok == 8 and all(cfg.sparse_layers)
    assert "30.53B parameters (3.35B active per token)" in text
    assert "data 1 x fsdp 4 x expert 8 x tensor 1 (planned for 32 devices)" in text and "WARNING" not in text
    experts = 48 * 128 * 3 * 2048 * 768
    per_device = (cfg.num_params - experts) / 4 + experts / 32  # parameters on one device
    assert f"params {per_device * 4 / 2**30:.2f} GiB" in text  # float32 parameters
    assert f"adam {per_device * 8 / 2**30:.2f} GiB" in text
    odd = describe_plan(load_config("rwml_alfworld", overrides[:-1] + ["--config.mesh.expert=3"]), num_devices=12)
    assert "128 experts do not split evenly over expert = 3" in odd


def test_checkpoint_loads_straight_into_expert_shards(sharded_results):
    """A per-expert HF checkpoint read into (fsdp 2, expert 2, tensor 2) shardings, each device reading only
    its experts' slices (the worker checks the shard shapes), gives one device's logits."""
    config, params = models.load_pretrained(sharded_results["hf_dir"])
    ids, mask = padded_batch(config.vocab_size, [9, 4, 6, 2], left=True)
    ref = np.asarray(models.forward(config, params, ids, mask))
    np.testing.assert_allclose(sharded_results["loaded:logits"], ref, rtol=0, atol=1e-5)
