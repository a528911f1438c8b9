"""The jitted GRPO / SFT update steps.

References: PyTorch `transformers` Qwen3 (log-probs, the GRPO and SFT losses and their gradients,
torch.optim.AdamW with clipping), and the same update on one device vs 8 forced CPU devices
(data x fsdp x tensor = 2x2x2) with and without micro-batching, in a subprocess.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from hf_fixtures import build_hf_model

from rwml_jax import sharding as sh
from rwml_jax.models.hf_io import load_pretrained
from rwml_jax.rl import batch as bt
from rwml_jax.rl import grpo
from rwml_jax.rl.logprobs import completion_logprobs
from rwml_jax.rl.sft import SFTConfig, make_sft_step
from rwml_jax.rl.shared_prompt import group_batch
from rwml_jax.rl.train_state import OptimizerConfig, create_train_state, learning_rate_schedule, make_optimizer
from rwml_jax.rl.update import GRPOConfig, NonFiniteLossError, make_grpo_step

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANT = "qwen3-gqa-tied-oddhd"
SGD_SCALE = 1000.0  # one step of p - SGD_SCALE * grad; (p0 - p1) / SGD_SCALE recovers the gradient


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(policy dir, torch policy, reference dir, torch reference): two tiny random Qwen3 checkpoints."""
    pol_dir = str(tmp_path_factory.mktemp("policy"))
    ref_dir = str(tmp_path_factory.mktemp("reference"))
    return pol_dir, build_hf_model(VARIANT, pol_dir, seed=0), ref_dir, build_hf_model(VARIANT, ref_dir, seed=1)


def make_batch(B=8, P=7, C=6, layout="split", seed=0, vocab=160, tight=False):
    """tight: a contiguous layout whose rows are only as long as the longest prompt + completion."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, vocab, rng.integers(1, P + 1)).tolist() for _ in range(B)]
    comps = [rng.integers(1, vocab, rng.integers(1, C + 1)).tolist() for _ in range(B)]
    comps[1] = []  # an empty completion contributes nothing and must not produce NaN
    seq_len = max(len(p) + len(c) for p, c in zip(prompts, comps)) if tight else None
    return bt.pack(prompts, comps, prompt_len=P, completion_len=C, layout=layout, seq_len=seq_len)


def torch_completion_logp(model, batch, temperature=1.0):
    """Reference: full-sequence logits from transformers, log_softmax(logits / temperature), completion
    tokens picked by hand."""
    import torch

    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
    pos = torch.clamp(torch.cumsum(mask, -1) - 1, min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    logp_all = torch.log_softmax(logits / temperature, -1)
    B, C = batch["completion_mask"].shape
    rows = []
    for b in range(B):
        row = []
        for j in range(C):
            s = int(batch["completion_start"][b]) + j
            row.append(logp_all[b, s - 1, ids[b, s]] if batch["completion_mask"][b, j] else torch.zeros(()))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def torch_grads_in_our_layout(model, tmp_path):
    """Save the .grad of every parameter (in a copy of `model`) as an HF checkpoint and load it with
    our converter."""
    import torch

    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    holder = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in holder.named_parameters():
            p.copy_(grads[n])
    holder.save_pretrained(str(tmp_path))
    return load_pretrained(str(tmp_path))[1]


def assert_leaves_close(got, want, rtol, what):
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err = np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)
        assert err <= rtol, f"{what} {jax.tree_util.keystr(path)}: max error {err:.2e} of the leaf's scale > {rtol}"


# ------------------------------------------------------------------------------------------------

def test_completion_logprobs_match_torch_in_every_layout(models):
    pol_dir, torch_pol, _, _ = models
    cfg, params = load_pretrained(pol_dir)
    want = torch_completion_logp(torch_pol, make_batch()).detach().numpy()
    fn = jax.jit(lambda p, b, chunk: completion_logprobs(cfg, p, b, chunk=chunk, with_entropy=True), static_argnums=2)
    for layout in bt.LAYOUTS:
        batch = make_batch(layout=layout)
        for chunk in (None, 2):
            logp, ent = fn(params, batch, chunk)
            np.testing.assert_allclose(np.asarray(logp), want, rtol=1e-5, atol=2e-5, err_msg=f"{layout} chunk={chunk}")
            assert np.all(np.asarray(ent)[batch["completion_mask"] > 0] > 0)
    tight = make_batch(layout="right", tight=True)  # the SFT loop's rows: shorter than prompt_len + completion_len
    assert tight["input_ids"].shape[1] < 7 + 6
    np.testing.assert_allclose(np.asarray(fn(params, tight, None)[0]), want, rtol=1e-5, atol=2e-5)
    hot = torch_completion_logp(torch_pol, make_batch(), temperature=1.7).detach().numpy()
    got = jax.jit(lambda p, b: completion_logprobs(cfg, p, b, chunk=2, temperature=1.7)[0])(params, make_batch())
    np.testing.assert_allclose(np.asarray(got), hot, rtol=1e-5, atol=2e-5)
    assert np.abs(hot - want).max() > 0.1  # the temperature is acted on


@pytest.mark.parametrize("kind", ["grpo", "grpo-tempered", "sft"])
def test_update_gradient_and_loss_match_torch(models, kind, tmp_path):
    """Loss and gradient of one update equal a PyTorch implementation of the same objective (GRPO also at a
    rollout temperature of 1.4: every log-prob, the reference's included, of softmax(logits / 1.4))."""
    import torch

    pol_dir, torch_pol, ref_dir, torch_ref = models
    cfg, params = load_pretrained(pol_dir)
    batch = make_batch(B=8)
    mask = torch.tensor(batch["completion_mask"], dtype=torch.float32)
    torch_pol.zero_grad()
    temperature = 1.4 if kind == "grpo-tempered" else 1.0
    logp = torch_completion_logp(torch_pol, batch, temperature)
    if kind.startswith("grpo"):
        rng = np.random.default_rng(1)
        adv = np.asarray(grpo.group_advantages(rng.integers(0, 2, 8).astype(np.float32), 4))
        old = (logp.detach().numpy() + rng.normal(0, 0.3, logp.shape)) * batch["completion_mask"]
        batch = bt.with_grpo_fields(batch, adv, old)
        with torch.no_grad():
            ref_logp = torch_completion_logp(torch_ref, batch, temperature)
        beta, eps_lo, eps_hi = 0.04, 0.2, 0.28
        ratio = torch.exp(logp - torch.tensor(batch["old_logp"]))
        A = torch.tensor(adv)[:, None]
        pg = torch.maximum(-A * ratio, -A * torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi))
        d = ref_logp - logp
        per_token = pg + beta * (torch.exp(d) - d - 1)
        loss = (per_token * mask).sum() / mask.sum()
        step = make_grpo_step(cfg, GRPOConfig(kl_coef=beta, clip_eps_low=eps_lo, clip_eps_high=eps_hi,
                                              temperature=temperature), optax.sgd(SGD_SCALE), sh.make_mesh())
        ref_params = load_pretrained(ref_dir)[1]
    else:
        loss = -(logp * mask).sum() / mask.sum()
        step = make_sft_step(cfg, SFTConfig(), optax.sgd(SGD_SCALE), sh.make_mesh())
        ref_params = None
    loss.backward()
    want = torch_grads_in_our_layout(torch_pol, tmp_path)

    p0 = jax.tree.map(np.asarray, params)
    state = create_train_state(params, step.optimizer, step.state_shardings)
    state, metrics = step(state, batch, ref_params)
    got = jax.tree.map(lambda a, b: (a - np.asarray(b)) / SGD_SCALE, p0, state.params)
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
    assert_leaves_close(got, want, 1e-4, "gradient")
    assert int(state.step) == 1 and float(metrics["finite"]) == 1.0
    if kind.startswith("grpo"):
        assert 0 < float(metrics["clip_frac"]) < 1 and float(metrics["ref_kl"]) > 0
    else:
        np.testing.assert_allclose(float(metrics["nll"]), loss.item(), rtol=1e-5)


def test_adamw_step_matches_torch_adamw(models, tmp_path):
    """Clipping + AdamW (decay on matrices only) + warm-up: two steps against torch.optim.AdamW."""
    import torch

    pol_dir, torch_pol, _, _ = models
    torch_pol = copy.deepcopy(torch_pol)
    cfg, params = load_pretrained(pol_dir)
    ocfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=2, weight_decay=0.1, max_grad_norm=0.5)
    step = make_sft_step(cfg, SFTConfig(), make_optimizer(ocfg), sh.make_mesh(), learning_rate=learning_rate_schedule(ocfg))
    batch = make_batch(B=8, seed=3)
    mask = torch.tensor(batch["completion_mask"], dtype=torch.float32)

    decay = [p for n, p in torch_pol.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in torch_pol.named_parameters() if "norm" in n]
    topt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
                             lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda k: min(1.0, (k + 1) / 2))
    state = create_train_state(params, step.optimizer, step.state_shardings)
    lrs = []
    for _ in range(2):
        topt.zero_grad()
        (-(torch_completion_logp(torch_pol, batch) * mask).sum() / mask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(torch_pol.parameters(), 0.5)
        topt.step()
        tsched.step()
        state, metrics = step(state, batch)
        lrs.append(float(metrics["learning_rate"]))
    assert lrs == pytest.approx([5e-4, 1e-3])
    torch_pol.save_pretrained(str(tmp_path))
    want = load_pretrained(str(tmp_path))[1]
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        rel = np.linalg.norm(g - w) / np.linalg.norm(w)
        assert rel < 1e-5, f"{jax.tree_util.keystr(path)}: relative difference {rel:.2e}"


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_state(models):
    pol_dir, _, _, _ = models
    cfg, params = load_pretrained(pol_dir)
    step = make_grpo_step(cfg, GRPOConfig(), make_optimizer(OptimizerConfig(learning_rate=1e-2)), sh.make_mesh())
    p0 = jax.tree.map(np.asarray, params)
    state = create_train_state(params, step.optimizer, step.state_shardings)
    good = bt.with_grpo_fields(make_batch(), np.linspace(-1, 1, 8))
    state, _ = step(state, good)
    state, _ = step(state, good)
    p2 = jax.tree.map(np.asarray, state.params)
    bad = bt.with_grpo_fields(make_batch(), np.where(np.arange(8) == 3, np.nan, 1.0))
    with pytest.raises(NonFiniteLossError, match="step 2") as info:
        step(state, bad)
    kept = info.value.state
    assert int(kept.step) == 2
    for a, b in zip(jax.tree.leaves(kept.params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p0)))
    # training continues from the kept state
    state, m = step(kept, good)
    assert int(state.step) == 3 and float(m["finite"]) == 1.0


def test_reference_forward_only_when_kl_is_used(models):
    """kl_coef == 0 compiles no reference pass; kl_coef > 0 adds exactly one forward's matmuls."""
    pol_dir, _, _, _ = models
    cfg, params = load_pretrained(pol_dir)
    mesh = sh.make_mesh()
    batch = bt.with_grpo_fields(make_batch(), np.ones(8))

    def count_dots(kl_coef):
        step = make_grpo_step(cfg, GRPOConfig(kl_coef=kl_coef), optax.sgd(1.0), mesh)
        state = jax.eval_shape(lambda p: create_train_state(p, step.optimizer), params)
        ref = params if kl_coef else None
        return step.lower(state, step.prepare_batch(batch), ref).as_text().count("stablehlo.dot_general")

    fwd = jax.jit(lambda p, b: completion_logprobs(cfg, p, b)[0]).lower(params, batch).as_text().count("stablehlo.dot_general")
    without, with_ref = count_dots(0.0), count_dots(0.1)
    assert with_ref - without == fwd, (without, with_ref, fwd)
    with pytest.raises(ValueError, match="ref_params"):
        step = make_grpo_step(cfg, GRPOConfig(kl_coef=0.1), optax.sgd(1.0), mesh)
        step(create_train_state(params, step.optimizer, step.state_shardings), batch)


def test_bad_batches_and_configs_name_the_problem(models):
    pol_dir, _, _, _ = models
    cfg, _ = load_pretrained(pol_dir)
    step = make_grpo_step(cfg, GRPOConfig(micro_batch_size=3), optax.sgd(1.0), sh.make_mesh())
    batch = bt.with_grpo_fields(make_batch(), np.ones(8))
    with pytest.raises(ValueError, match="micro_batch_size=3 does not divide the batch size 8"):
        step.prepare_batch(batch)
    with pytest.raises(KeyError, match="advantages"):
        step.prepare_batch(make_batch())
    with pytest.raises(ValueError, match="loss_agg='sum'"):
        GRPOConfig(loss_agg="sum")
    with pytest.raises(ValueError, match="total_steps"):
        OptimizerConfig(schedule="cosine")


def shared_prompt_batch(groups=3, G=4, P=9, C=6, seed=2, vocab=160):
    """GRPO-ordered rows: `groups` prompts of different lengths, G completions each (one empty)."""
    rng = np.random.default_rng(seed)
    prompts, comps = [], []
    for _ in range(groups):
        p = rng.integers(1, vocab, rng.integers(1, P + 1)).tolist()
        for _ in range(G):
            prompts.append(p)
            comps.append(rng.integers(1, vocab, rng.integers(1, C + 1)).tolist())
    comps[2] = []
    return bt.pack(prompts, comps, prompt_len=P, completion_len=C)


def test_shared_prompt_logprobs_match_torch(models):
    """Each group's prompt run once (rl.shared_prompt) gives the log-probs and entropies of every row
    running its own copy, and those equal transformers'."""
    pol_dir, torch_pol, _, _ = models
    cfg, params = load_pretrained(pol_dir)
    batch = shared_prompt_batch()
    want = torch_completion_logp(torch_pol, batch).detach().numpy()
    flat, flat_ent = completion_logprobs(cfg, params, batch, with_entropy=True)
    got, ent = jax.jit(lambda p, b: completion_logprobs(cfg, p, b, with_entropy=True))(
        params, group_batch(batch, 4))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(flat_ent), rtol=1e-5, atol=2e-5)
    assert np.abs(np.asarray(got)[2]).max() == 0.0  # the empty completion
    assert np.abs(np.asarray(got) - np.asarray(flat)).max() < 2e-5


def test_shared_prompt_batches_are_checked(models):
    pol_dir, _, _, _ = models
    cfg, _ = load_pretrained(pol_dir)
    batch = bt.with_grpo_fields(shared_prompt_batch(), np.ones(12))
    step = make_grpo_step(cfg, GRPOConfig(prompt_group_size=4, micro_batch_size=6), optax.sgd(1.0), sh.make_mesh())
    with pytest.raises(ValueError, match="micro_batch_size=6 is not a multiple of prompt_group_size=4"):
        step.prepare_batch(batch)
    step = make_grpo_step(cfg, GRPOConfig(prompt_group_size=4), optax.sgd(1.0), sh.make_mesh())
    assert step.prepare_batch(batch)["completion_ids"].shape == (3, 4, 6)
    mixed = {k: v.copy() for k, v in batch.items()}
    mixed["input_ids"][5, 8] += 1  # row 5 (group 1) gets a different last prompt token
    with pytest.raises(ValueError, match=r"group 1 \(rows 4..7\) do not all have the same prompt"):
        step.prepare_batch(mixed)
    right = bt.pack([[3, 4]] * 4, [[5], [6, 7], [8], [9]], prompt_len=3, completion_len=2, layout="right")
    with pytest.raises(ValueError, match="'split' layout"):
        step.prepare_batch(bt.with_grpo_fields(right, np.ones(4)))
    with pytest.raises(ValueError, match="not a whole number of prompt groups of 4"):
        step.prepare_batch({k: v[:6] for k, v in batch.items()})


@pytest.mark.parametrize("prompts,G,micro,devices,want", [
    (32, 8, 16, 1, (8, 16)),  # one device: the requested micro-batch holds 2 groups
    (32, 8, 16, 8, (8, 64)),  # 8 devices: rounded up to one group per device
    (32, 8, 16, 64, (4, None)),  # 32 groups cannot spread over 64 devices; sub-groups of 4 can
    (32, 16, 16, 8, (16, 128)),
    (3, 8, 8, 2, (4, 8)),  # 3 groups over 2 devices: sub-groups of 4, 6 of them
    (3, 7, 7, 2, (0, 7)),  # no sub-group size fits: rows run their own prompts
    (8, 8, 64, 1, (8, None)),  # the micro-batch is the whole batch
])
def test_shared_prompt_micro_batching(prompts, G, micro, devices, want):
    from rwml_jax.rl.shared_prompt import micro_batching

    got = micro_batching(prompts, G, micro, devices)
    assert got == want
    share, m = got
    rows, m = prompts * G, got[1] or prompts * G
    assert rows % m == 0 and (not share or (G % share == 0 and m % (share * devices) == 0))


def test_plan_reports_the_shared_prompt_micro_batches():
    from rwml_jax.config import load_config
    from rwml_jax.train.plan import describe_plan

    text = describe_plan(load_config("rwml_alfworld"), num_devices=8)
    assert "256 sequences/step in 4 micro-batches of 64; prompts shared by 8 rows" in text, text
    text = describe_plan(load_config("rwml_alfworld", ["--config.rwml.share_prompts=False"]), num_devices=8)
    assert "256 sequences/step in 16 micro-batches of 16;" in text


def test_learning_rate_schedules():
    warm = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=4))
    assert [float(warm(k)) for k in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    cos = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=2, schedule="cosine",
                                                 total_steps=12, end_lr_ratio=0.1))
    vals = [float(cos(k)) for k in range(14)]
    assert vals[:3] == pytest.approx([0.5, 1.0, 1.0]) and vals[7] == pytest.approx(0.55, abs=1e-6)
    assert vals[12:] == pytest.approx([0.1, 0.1]) and all(a >= b for a, b in zip(vals[1:], vals[2:]))


def test_pack_layouts_and_errors():
    b = bt.pack([[5, 6], [7]], [[8, 9, 10], []], prompt_len=3, completion_len=3, layout="split")
    np.testing.assert_array_equal(b["input_ids"], [[0, 5, 6, 8, 9, 10], [0, 0, 7, 0, 0, 0]])
    np.testing.assert_array_equal(b["completion_start"], [3, 3])
    np.testing.assert_array_equal(b["completion_mask"], [[1, 1, 1], [0, 0, 0]])
    r = bt.pack([[5, 6], [7]], [[8, 9, 10], [11]], prompt_len=3, completion_len=3, layout="right")
    np.testing.assert_array_equal(r["input_ids"], [[5, 6, 8, 9, 10, 0], [7, 11, 0, 0, 0, 0]])
    np.testing.assert_array_equal(r["completion_start"], [2, 1])
    left = bt.pack([[5, 6], [7]], [[8, 9, 10], [11]], prompt_len=3, completion_len=3, layout="left")
    np.testing.assert_array_equal(left["input_ids"], [[0, 5, 6, 8, 9, 10], [0, 0, 0, 0, 7, 11]])
    np.testing.assert_array_equal(left["attention_mask"], [[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    with pytest.raises(ValueError, match="row 1: prompt has 4 tokens"):
        bt.pack([[1], [1, 2, 3, 4]], [[1], [1]], prompt_len=3)
    with pytest.raises(ValueError, match="row 0: empty prompt"):
        bt.pack([[]], [[1]])
    short = bt.pack([[5, 6], [7]], [[8, 9, 10], [11]], prompt_len=3, completion_len=3, layout="right", seq_len=5)
    np.testing.assert_array_equal(short["input_ids"], [[5, 6, 8, 9, 10], [7, 11, 0, 0, 0]])
    with pytest.raises(ValueError, match="row 0: prompt \\+ completion has 5 tokens, more than seq_len=4"):
        bt.pack([[5, 6], [7]], [[8, 9, 10], [11]], prompt_len=3, completion_len=3, layout="right", seq_len=4)
    with pytest.raises(ValueError, match="layout='split' has T"):
        bt.pack([[5]], [[8]], layout="split", seq_len=5)
    s = bt.from_sampler(np.array([[0, 3, 4]]), np.array([[0, 1, 1]]), np.array([[8, 9]]), np.array([[1, 0]]))
    np.testing.assert_array_equal(s["input_ids"], [[0, 3, 4, 8, 9]])
    np.testing.assert_array_equal(s["completion_start"], [3])


# ------------------------------------------------------------------------------------------------
# 8 forced CPU devices (subprocess: the device count is fixed when JAX starts)
# ------------------------------------------------------------------------------------------------

SCENARIOS = ["grpo_1dev", "grpo_8dev", "grpo_micro_8dev", "seqsum_1dev", "seqsum_micro_8dev", "sft_1dev",
             "sft_micro_8dev", "adamw_1dev", "adamw_micro_8dev", "shared_flat_1dev", "shared_1dev",
             "shared_micro_8dev"]


def run_worker(out, scenarios, devices=8, extra=(), env=None):
    cmd = [sys.executable, os.path.join(HERE, "update_worker.py"), "--devices", str(devices), "--out", str(out),
           "--scenarios", *scenarios, *extra]
    return subprocess.Popen(cmd, env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def load_results(path):
    r = dict(np.load(path))
    return lambda name: {k[len(name) + 1:]: v for k, v in r.items() if k.startswith(name + "/")}, r


def gradient_of(init, after):
    return {k: (init[k] - after[k]) / SGD_SCALE for k in init}


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "res.npz"
    proc = run_worker(out, SCENARIOS)
    log, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, log[-5000:]
    return load_results(out)


def assert_same(a, b, rtol, what):
    for k in b:
        err = np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()
        assert err <= rtol, f"{what} {k}: {err:.2e} > {rtol}"


@pytest.mark.parametrize("sharded,single", [("grpo_8dev", "grpo_1dev"), ("grpo_micro_8dev", "grpo_1dev"),
                                            ("seqsum_micro_8dev", "seqsum_1dev"), ("sft_micro_8dev", "sft_1dev"),
                                            ("shared_1dev", "shared_flat_1dev"),
                                            ("shared_micro_8dev", "shared_flat_1dev")])
def test_sharded_and_micro_batched_gradient_equals_single_device(sharded_results, sharded, single):
    """2x2x2 mesh (and 2 or 4 micro-batches) vs one device, whole batch: gradients to 1e-5 of each
    leaf's scale. "shared_*": GRPO groups sharing their prompt, run once per group
    (prompt_group_size = 2, with and without micro-batches of whole groups on the 2x2x2 mesh) vs every
    row running its own copy of the prompt."""
    leaves, r = sharded_results
    init = leaves("init")
    assert_same(gradient_of(init, leaves(sharded)), gradient_of(init, leaves(single)), 1e-5, f"{sharded} vs {single}")
    np.testing.assert_allclose(r[f"{sharded}:losses"], r[f"{single}:losses"], rtol=1e-5)
    assert int(r[f"{sharded}:step"]) == 1


def test_sharded_micro_batched_adamw_updates_equal_single_device(sharded_results):
    """Three AdamW steps (seq-mean-token-mean, k1 KL): 8 devices x 4 micro-batches vs 1 device."""
    leaves, r = sharded_results
    assert_same(leaves("adamw_micro_8dev"), leaves("adamw_1dev"), 1e-5, "params")
    np.testing.assert_allclose(r["adamw_micro_8dev:losses"], r["adamw_1dev:losses"], rtol=1e-5)
    assert int(r["adamw_micro_8dev:step"]) == 3
