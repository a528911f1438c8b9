"""The jitted sampler against PyTorch `transformers` generate, `forward` log-probs and the softmax distribution."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from scipy import stats

from hf_fixtures import VARIANTS, build_hf_model
from rwml_jax import models, platform, sampling
from rwml_jax.models import decoder
from rwml_jax.sampling import filters, tiny
from rwml_jax.sampling.weight_format import FORMATS, DecodeWeights

POOL = sampling.SamplerPool()  # compiled samplers shared by this module's tests


def generate(*args, **kw):
    return sampling.generate(*args, pool=POOL, **kw)

LENGTHS = [7, 3, 12, 1, 5]


def _prompts(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


def _hf_greedy(torch_model, prompts, max_new_tokens, eos_token_id):
    """transformers generate(do_sample=False) on the left-padded batch; per row, cut after the first EOS."""
    import torch

    T = max(map(len, prompts))
    ids = np.zeros((len(prompts), T), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=eos_token_id,
        ).numpy()[:, T:]
    rows = []
    for r in out.tolist():
        if eos_token_id is not None and eos_token_id in r:
            r = r[: r.index(eos_token_id) + 1]
        rows.append(r)
    return rows


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    torch_model = build_hf_model(request.param, path)
    config, params = models.load_pretrained(path)
    return request.param, torch_model, config, params


def test_greedy_matches_transformers_generate(hf_model):
    """Token-for-token equality, per row, on a left-padded batch of different prompt lengths; then the same
    with a stop token that ends some rows early (HF as eos_token_id, ours as stop_token_ids)."""
    name, torch_model, config, params = hf_model
    prompts = _prompts(config.vocab_size)
    N = 12
    ref = _hf_greedy(torch_model, prompts, N, None)
    out = generate(config, params, prompts, max_new_tokens=N, temperature=0.0, stop_at_eos=False)
    for i, row in enumerate(ref):
        assert out[i].token_ids == row, (name, i)
        assert out[i].finish_reason == "length"
    for orientation in FORMATS:  # whichever one this machine's "auto" did not pick
        other = sampling.Sampler(config, max_new_tokens=N, weight_orientation=orientation)
        got = other.generate(params, prompts, temperature=0.0, stop_at_eos=False)
        assert got.token_ids == ref, (name, orientation)

    stop_tok = ref[0][N // 2]  # a token some rows generate mid-way
    ref = _hf_greedy(torch_model, prompts, N, stop_tok)
    out = generate(config, params, prompts, max_new_tokens=N, temperature=0.0, stop_at_eos=False,
                            stop_token_ids=[stop_tok])
    assert out.token_ids == ref, name
    assert out[0].finish_reason == "stop_token" and out[0].token_ids[-1] == stop_tok
    assert len(out[0].token_ids) <= N // 2 + 1


def _forward_logprobs(config, params, prompt, completion, temperature=1.0):
    logits = np.asarray(models.forward(config, params, np.asarray([prompt + completion])))[0]
    logp = np.asarray(jax.nn.log_softmax(logits / temperature, axis=-1))
    start = len(prompt) - 1
    return logp[start: start + len(completion)], logits[start: start + len(completion)]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen3-s"))
    build_hf_model("qwen3-gqa-tied-oddhd", path)
    return models.load_pretrained(path)


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.3, top_k=7, top_p=0.8)],
                         ids=["greedy", "tempered-topk-topp"])
def test_logprobs_equal_forward_log_softmax(qwen3, settings):
    """Returned log-probs are log_softmax(forward logits / temperature) at the chosen tokens (temperature 1
    when greedy), whatever the top-k / top-p filter: the policy GRPO trains at the rollout temperature."""
    config, params = qwen3
    prompts = _prompts(config.vocab_size, seed=3)
    out = generate(config, params, prompts, max_new_tokens=10, seed=5, stop_at_eos=False, **settings)
    for i, p in enumerate(prompts):
        logp, logits = _forward_logprobs(config, params, p, out[i].token_ids, settings["temperature"] or 1.0)
        chosen = logp[np.arange(len(out[i].token_ids)), out[i].token_ids]
        assert out[i].logprobs.dtype == np.float32
        assert np.abs(chosen - out[i].logprobs).max() < 1e-4
        if settings["temperature"] == 0.0:
            assert out[i].token_ids == logits.argmax(-1).tolist()


def _expected_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The sampling distribution computed independently in numpy (HF order: temperature, top-k, top-p)."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.ones_like(z, bool)
    if top_k:
        keep[order[top_k:]] = False
    p = np.exp(z - z.max()) * keep
    p /= p.sum()
    if top_p < 1.0:
        sorted_p = p[order]
        mass_before = np.cumsum(sorted_p) - sorted_p
        keep_sorted = mass_before < top_p
        keep = np.zeros_like(keep)
        keep[order[keep_sorted]] = True
        p = p * keep
        p /= p.sum()
    return p


def _pooled(counts: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(observed, expected) with the categories of expected count < 5 pooled into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return obs, exp


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit (categories with expected count < 5 pooled)."""
    return float(stats.chisquare(*_pooled(counts, probs)).pvalue)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 12, 1.0), (1.0, 0, 0.6), (1.5, 20, 0.9)],
                         ids=["temp0.7", "top_k12", "top_p0.6", "temp1.5-k20-p0.9"])
def test_sampled_frequencies_match_softmax(qwen3, temperature, top_k, top_p):
    """2048 rows share one prompt: token 0 (prefill) and token 1 (decode loop, rows grouped by token 0) follow
    the filtered softmax (chi-square p > 1e-3); no token outside the top-k / top-p set is ever drawn."""
    config, params = qwen3
    # sharpen the random model (logits x4 via the final norm's scale) so that many tokens have expected
    # counts >= 5 in the decode-loop groups below; the sampler sees the sharpened logits as they are
    params = dict(params, final_norm={"scale": params["final_norm"]["scale"] * 4})
    prompt = _prompts(config.vocab_size, [6], seed=11)[0]
    rows = 2048
    out = generate(config, params, [prompt] * rows, max_new_tokens=2, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=17, stop_at_eos=False)
    first, second = out.tokens[:, 0], out.tokens[:, 1]

    logits = np.asarray(models.forward(config, params, np.asarray([prompt])))[0, -1]
    probs = _expected_probs(logits, temperature, top_k, top_p)
    counts = np.bincount(first, minlength=config.vocab_size)
    assert counts[probs == 0].sum() == 0, "sampled a token outside the top-k / top-p set"
    assert _chi_square_pvalue(counts, probs) > 1e-3

    # token 1 comes from the decode loop; given token 0 = t its distribution is the filtered softmax of
    # forward(prompt + [t]). The 4 most frequent first tokens' groups are tested jointly.
    obs, exp = [], []
    groups = np.argsort(-np.bincount(first, minlength=config.vocab_size))[:4]
    for t0 in groups:
        group = second[first == t0]
        logits2 = np.asarray(models.forward(config, params, np.asarray([prompt + [int(t0)]])))[0, -1]
        probs2 = _expected_probs(logits2, temperature, top_k, top_p)
        counts2 = np.bincount(group, minlength=config.vocab_size)
        assert counts2[probs2 == 0].sum() == 0, "sampled a token outside the top-k / top-p set"
        o, e = _pooled(counts2, probs2)
        obs.append(o)
        exp.append(e)
    assert sum(len(g) for g in [second[first == t] for t in groups]) > 200
    pvalue = stats.chisquare(np.concatenate(obs), np.concatenate(exp), ddof=len(groups) - 1).pvalue
    assert pvalue > 1e-3


def test_filters_reference_distribution_matches_numpy():
    """`filtered_logits` (the reference the sampler's candidates come from) equals the numpy filter."""
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 2
    for t, k, p in [(0.5, 0, 0.7), (1.0, 5, 1.0), (2.0, 10, 0.5)]:
        mode = filters.sampling_mode(t, k, p, 50)
        got = np.asarray(jax.nn.softmax(filters.filtered_logits(logits, mode, np.float32(t), np.float32(p)), -1))
        for r in range(3):
            np.testing.assert_allclose(got[r], _expected_probs(logits[r], t, k, p), atol=1e-6)


def test_first_argmax_equals_numpy_argmax_with_ties_nan_and_inf():
    """The greedy pick (two plain reductions) is numpy's argmax: the first maximum, the first NaN."""
    x = np.random.default_rng(1).normal(size=(6, 300)).astype(np.float32)
    x[0, [17, 40]] = 9.0  # tie: the first one
    x[1, [5, 250]] = np.nan  # NaN wins, the first one
    x[2] = -np.inf  # all -inf: index 0
    x[3, :] = 0.0  # all equal
    x[4, 299] = np.inf
    got = np.asarray(jax.jit(filters.first_argmax)(x))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32


def test_same_seed_same_tokens_and_batch_independent(qwen3):
    """Deterministic per seed; a row's sample does not depend on the batch bucket or the other rows."""
    config, params = qwen3
    prompts = _prompts(config.vocab_size, seed=4)
    kw = dict(max_new_tokens=8, temperature=1.0, stop_at_eos=False)
    a = generate(config, params, prompts, seed=1, **kw)
    b = generate(config, params, prompts, seed=1, **kw)
    c = generate(config, params, prompts, seed=2, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    alone = generate(config, params, prompts[:1], seed=1, **kw)  # batch bucket 1 instead of 8
    assert alone[0].token_ids == a[0].token_ids


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0, top_k=9, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_num_samples_shares_the_prompt_and_keeps_the_rows(qwen3, settings):
    """num_samples=n: each prompt prefilled once, its keys and values shared by its n rows in every decode
    step. Its rows are those of passing every prompt n times: greedy token for token; sampled with the
    same seed the same rows, except where float rounding (the shared prefix sums the attention in another
    order) flips a near-tie; and every row's log-probs are log_softmax of `forward` at its tokens."""
    config, params = qwen3
    prompts = _prompts(config.vocab_size, [7, 3, 12], seed=6)
    kw = dict(max_new_tokens=9, seed=2, stop_at_eos=False, **settings)
    want = generate(config, params, [p for p in prompts for _ in range(4)], **kw)
    got = generate(config, params, prompts, num_samples=4, **kw)
    assert got.prompt_lengths == [7] * 4 + [3] * 4 + [12] * 4
    same = [a.token_ids == b.token_ids for a, b in zip(got, want)]
    if settings["temperature"] == 0.0:
        assert all(same)
    else:
        assert sum(same) >= 9, same
        assert len({tuple(r.token_ids) for r in got}) > len(prompts)  # a prompt's samples differ
    for i, row in enumerate(got):
        logp, _ = _forward_logprobs(config, params, prompts[i // 4], row.token_ids)
        chosen = logp[np.arange(len(row.token_ids)), row.token_ids]
        assert np.abs(chosen - row.logprobs).max() < 1e-4, i
    with pytest.raises(ValueError, match="num_samples=0"):
        generate(config, params, prompts, num_samples=0, **kw)


def test_decode_loop_exits_when_all_rows_stop(qwen3):
    """Once every row has hit a stop token the while_loop ends: fewer steps than max_new_tokens."""
    config, params = qwen3
    prompts = _prompts(config.vocab_size, seed=6)
    free = generate(config, params, prompts, max_new_tokens=16, temperature=0.0, stop_at_eos=False)
    assert free.decode_steps == 16
    stops = sorted({row[2] for row in free.token_ids})  # every row stops at or before its 3rd token
    out = generate(config, params, prompts, max_new_tokens=16, temperature=0.0, stop_at_eos=False,
                            stop_token_ids=stops)
    assert out.decode_steps <= 3
    for i, row in enumerate(free.token_ids):
        n = next(j for j, t in enumerate(row) if t in stops) + 1
        assert out[i].token_ids == row[:n] and out[i].finish_reason == "stop_token"
        np.testing.assert_allclose(out[i].logprobs, free[i].logprobs[:n], atol=1e-6)


def test_stop_at_eos_uses_the_config_eos(qwen3):
    config, params = qwen3
    prompts = _prompts(config.vocab_size, seed=12)
    free = generate(config, params, prompts, max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    eos = free[0].token_ids[2]
    out = generate(config.replace(eos_token_id=eos), params, prompts, max_new_tokens=8, temperature=0.0)
    assert out[0].finish_reason == "stop_token" and out[0].token_ids[-1] == eos
    assert out[0].token_ids == free[0].token_ids[: free[0].token_ids.index(eos) + 1]


def test_prompt_and_batch_buckets_do_not_recompile(qwen3):
    """Prompts of other lengths / counts within the same buckets and new temperature / seed / max_new_tokens
    values reuse the compiled prefill and decode."""
    config, params = qwen3
    sampler = sampling.Sampler(config, max_new_tokens=8)
    sampler.generate(params, _prompts(config.vocab_size, [5, 9, 3]), temperature=0.8)
    n = sampler.num_compilations
    assert n == 3  # prepare + prefill + decode
    sampler.generate(params, _prompts(config.vocab_size, [16, 2, 11, 4], seed=1), temperature=1.3, seed=4,
                     max_new_tokens=5)
    assert sampler.num_compilations == n
    sampler.generate(params, _prompts(config.vocab_size, [17]), temperature=0.8)  # prompt bucket 32
    assert sampler.num_compilations == n + 2
    sampler.generate(params, _prompts(config.vocab_size, [3]), temperature=0.0)  # greedy mode
    assert sampler.num_compilations == n + 4


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    tok = tiny.tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))
    config, params = tiny.tiny_model(tok, seed=3)
    return tok, config, params


def test_stop_strings_cut_tokens_and_text(tiny_chat_model):
    """A stop string taken from an unconstrained greedy run: tokens end with the token completing it (same
    tokens and log-probs as the free run up to there), the text ends right before it."""
    tok, config, params = tiny_chat_model
    prompts = [tok.encode("Action: go to countertop 1\nObservation:"), tok.encode("Your task is to")]
    free = generate(config, params, prompts, max_new_tokens=24, temperature=0.0, tokenizer=tok,
                             stop_at_eos=False)
    text0 = free.texts[0]
    stop_str = text0[len(text0) // 2: len(text0) // 2 + 3]
    assert len(stop_str) == 3
    out = generate(config, params, prompts, max_new_tokens=24, temperature=0.0, tokenizer=tok,
                            stop_at_eos=False, stop_strings=[stop_str])
    for i in range(2):
        full = free.texts[i]
        if stop_str in full:
            assert out[i].finish_reason == "stop_string"
            assert out.texts[i] == full[: full.index(stop_str)]
            n = out[i].num_tokens
            assert out[i].token_ids == free[i].token_ids[:n]
            assert stop_str in tok.decode(out[i].token_ids) and stop_str not in tok.decode(out[i].token_ids[:-1])
            np.testing.assert_allclose(out[i].logprobs, free[i].logprobs[:n], atol=1e-6)
        else:
            assert out[i].token_ids == free[i].token_ids and out.texts[i] == full
    with pytest.raises(ValueError, match="tokenizer"):
        generate(config, params, prompts, max_new_tokens=4, stop_strings=["x"])


def test_stop_sequence_ends_decode_on_device(tiny_chat_model):
    """A stop string whose canonical tokenization is generated stops the row inside the decode loop."""
    tok, config, params = tiny_chat_model
    prompt = tok.encode("Thought: I need to find")
    free = generate(config, params, [prompt], max_new_tokens=32, temperature=0.0, tokenizer=tok,
                             stop_at_eos=False)
    ids = free[0].token_ids
    # a two-token span whose decoded text re-encodes to the same two tokens
    j = next(j for j in range(4, 30) if tok.encode(tok.decode(ids[j:j + 2])) == ids[j:j + 2])
    stop_str = tok.decode(ids[j:j + 2])
    out = generate(config, params, [prompt], max_new_tokens=32, temperature=0.0, tokenizer=tok,
                            stop_at_eos=False, stop_strings=stop_str)
    assert out[0].finish_reason == "stop_string"
    assert out.decode_steps <= j + 2 < 32
    assert out[0].token_ids == ids[: out[0].num_tokens]


def test_generate_chat_applies_template_and_stops_at_end_of_turn(tiny_chat_model):
    tok, config, params = tiny_chat_model
    convs = [[{"role": "user", "content": "Your task is to: put a clean mug in the coffeemachine."}],
             [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "go to fridge 1"}]]
    texts = sampling.generate_chat(config, params, tok, convs, max_new_tokens=12, temperature=0.0)
    prompts = [tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for c in convs]
    ref = generate(config, params, prompts, max_new_tokens=12, temperature=0.0, tokenizer=tok)
    assert texts == ref.texts and all(isinstance(t, str) for t in texts)
    assert all(r.finish_reason in ("stop_token", "length") for r in ref)
    with pytest.raises(ValueError, match="role"):
        sampling.generate_chat(config, params, tok, [[{"content": "hi"}]], max_new_tokens=2)
    with pytest.raises(ValueError, match="list of conversations"):
        sampling.generate_chat(config, params, tok, "hello", max_new_tokens=2)


def test_bad_arguments_are_named(qwen3):
    config, params = qwen3
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(config, params, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"outside \[0, 160\)"):
        generate(config, params, [[1, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        generate(config, params, [[1]], max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(config, params, [[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="stop token id"):
        generate(config, params, [[1]], max_new_tokens=2, stop_token_ids=[10_000])
    with pytest.raises(ValueError, match="string; pass tokenizer"):
        generate(config, params, ["hello"], max_new_tokens=2)
    with pytest.raises(ValueError, match="allows 1..8"):
        sampling.Sampler(config, max_new_tokens=8).generate(params, [[1]], max_new_tokens=9)


def test_sharded_run_gives_single_device_tokens(qwen3, tmp_path):
    """8 forced CPU devices, batch over data=8 and over (data=2, fsdp=2, tensor=2), the latter also in the
    decode-layout weight formats that "auto" does not pick here and with num_samples=3: same tokens as
    1 device."""
    config, params = qwen3
    path = str(tmp_path / "model")
    models.save_pretrained(config, params, path)
    prompts = _prompts(config.vocab_size, [7, 3, 12, 1, 5, 9], seed=8)
    kw = dict(max_new_tokens=10, stop_at_eos=False)
    settings = [dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(temperature=0.9, top_k=9, top_p=0.8, seed=4)]
    script = textwrap.dedent(f"""
        import json, numpy as np, jax
        from rwml_jax import models, sampling, sharding
        assert jax.device_count() == 8
        out = {{}}
        pool = sampling.SamplerPool()
        for shape in [(8, 1, 1), (2, 2, 2)]:
            mesh = sharding.make_mesh(*shape)
            config, params = models.load_pretrained({path!r}, mesh=mesh)
            for j, s in enumerate({settings!r}):
                r = sampling.generate(config, params, {prompts!r}, mesh=mesh, pool=pool, **{kw!r}, **s)
                out[f"{{shape}}-{{j}}"] = [r.token_ids, r.logprobs.tolist()]
        # the decode-layout weight formats that "auto" did not pick, on the mixed mesh
        auto = sampling.Sampler(config, max_new_tokens=10, mesh=mesh).weight_orientation
        others = [o for o in {FORMATS!r} if o != auto]
        assert len(others) == {len(FORMATS) - 1}
        for other in others:
            sampler = sampling.Sampler(config, max_new_tokens=10, mesh=mesh, weight_orientation=other)
            for j, s in enumerate({settings!r}):
                r = sampler.generate(params, {prompts!r}, **{kw!r}, **s)
                out[f"{{other}}-{{j}}"] = [r.token_ids, r.logprobs.tolist()]
        # each prompt prefilled once for 3 samples, on the mixed mesh
        r = sampling.generate(config, params, {prompts[:4]!r}, mesh=mesh, pool=pool, num_samples=3, **{kw!r}, **{settings[1]!r})
        out["samples"] = [r.token_ids, r.logprobs.tolist()]
        json.dump(out, open({str(tmp_path / "sharded.json")!r}, "w"))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=900)
    sharded = json.load(open(tmp_path / "sharded.json"))
    config1, params1 = models.load_pretrained(path)
    for j, s in enumerate(settings):
        ref = generate(config1, params1, prompts, **kw, **s)
        others = [k[:-2] for k in sharded if k.endswith(f"-{j}") and not k.startswith("(")]
        assert len(others) == len(FORMATS) - 1, sorted(sharded)
        for shape in ["(8, 1, 1)", "(2, 2, 2)", *others]:
            tokens, logprobs = sharded[f"{shape}-{j}"]
            assert tokens == ref.token_ids, (shape, s)
            logprobs = np.asarray(logprobs)  # [rows, capacity]; the capacities differ, the columns after 10 are 0
            np.testing.assert_allclose(logprobs, ref.logprobs[:, :logprobs.shape[1]], atol=1e-5)
    ref = generate(config1, params1, prompts[:4], num_samples=3, **kw, **settings[1])
    assert sharded["samples"][0] == ref.token_ids
    np.testing.assert_allclose(np.asarray(sharded["samples"][1]), ref.logprobs, atol=1e-5)


def test_cli_generate_tiny_runs_offline(capsys):
    from rwml_jax import cli

    rc = cli.main(["generate", "--tiny", "--prompt", "Action: go to", "--prompt", "Your task is",
                   "--max-new-tokens", "6", "--temperature", "0"])
    assert rc == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert any(line.startswith("[0] ") for line in lines) and any(line.startswith("[1] ") for line in lines)
    assert "tokens/s" in printed


def test_per_layer_and_stacked_params_agree(qwen3):
    """`Sampler.prepare` output passed back in gives the same result as the stacked params."""
    config, params = qwen3
    sampler = sampling.Sampler(config, max_new_tokens=6)
    prompts = _prompts(config.vocab_size, seed=9)
    a = sampler.generate(params, prompts, temperature=0.0, stop_at_eos=False)
    prepared = sampler.prepare(params)
    assert "attn" not in prepared["layers"][0]  # the decode weight format, not the model's tree
    b = sampler.generate(prepared, prompts, temperature=0.0, stop_at_eos=False)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="must come from this sampler's `prepare`"):
        sampler.generate(decoder.unstack_layers(params), prompts, temperature=0.0)


def test_weight_orientations_agree_and_do_not_mix(qwen3):
    """All decode-layout weight formats give the same tokens and log-probs (up to float rounding); params
    prepared for one are refused by a sampler of another; an unknown format is named."""
    config, params = qwen3
    prompts = _prompts(config.vocab_size, seed=11)
    samplers = {o: sampling.Sampler(config, max_new_tokens=8, weight_orientation=o) for o in FORMATS}
    outs = {o: s.generate(params, prompts, temperature=1.0, seed=3, stop_at_eos=False) for o, s in samplers.items()}
    first, *rest = outs.values()
    for other in rest:
        np.testing.assert_array_equal(first.tokens, other.tokens)
        np.testing.assert_allclose(first.logprobs, other.logprobs, atol=1e-5)
    auto = sampling.Sampler(config, max_new_tokens=8)
    assert auto.weight_orientation == platform.default_weight_format(jax.devices(), config)
    prepared = samplers["in_out"].prepare(params)
    assert "qkv_w" in prepared["layers"][0] and "qkv_t" not in prepared["layers"][0]
    reduced = samplers["out_in_reduce"].prepare(params)
    assert "qkv_r" in reduced["layers"][0] and "lm_head_w" not in reduced  # the tied head needs no copy
    with pytest.raises(ValueError, match="weight orientation 'out_in'"):
        samplers["out_in"].generate(prepared, prompts, temperature=0.0)
    with pytest.raises(ValueError, match="weight orientation 'in_out'"):
        samplers["in_out"].generate(reduced, prompts, temperature=0.0)
    with pytest.raises(ValueError, match="weight orientation 'rows'"):
        sampling.Sampler(config, max_new_tokens=8, weight_orientation="rows")


def test_default_weight_format_follows_model_size_and_machine(qwen3):
    """"auto": on a CPU, a model whose weights exceed the last-level cache gets the reduction format when
    this XLA build hands skinny multiply-and-sum products to a library kernel (JAX 0.10, the version pip
    resolves on Python 3.11, does: YNNPACK); a model that fits keeps a dot format; off the CPU always
    "out_in"."""
    import dataclasses

    from rwml_jax.bench.generate_bench import shape_config

    cpus = jax.devices("cpu")
    fits = qwen3[0]
    big = shape_config("small")
    llc = platform.last_level_cache_bytes()
    while platform.weight_bytes(big) <= llc:  # a machine with a larger cache than this one's 32 MB
        big = dataclasses.replace(big, vocab_size=big.vocab_size * 4)
    assert platform.weight_bytes(fits) < llc, llc
    library = platform.cpu_reduce_is_library_kernel()
    if jax.__version_info__[:2] == (0, 10):
        assert library, "expected XLA:CPU to lower the multiply-and-sum to a ynn_fusion"
    dot_format = platform.default_weight_format(cpus)
    assert dot_format in ("in_out", "out_in")
    assert platform.default_weight_format(cpus, big) == ("out_in_reduce" if library else dot_format)
    assert platform.default_weight_format(cpus, fits) == dot_format

    class _Gpu:
        platform = "gpu"

    assert platform.default_weight_format([_Gpu()], big) == "out_in"


@pytest.mark.parametrize("layout", ["stacked", "per-layer", "decode-fused-out_in", "decode-unfused-out_in",
                                    "decode-fused-in_out", "decode-unfused-in_out", "decode-fused-out_in_reduce",
                                    "decode-unfused-out_in_reduce"])
def test_cached_decoding_equals_forward(qwen3, layout):
    """`apply` with a KV cache (a left-padded prefill, then one token at a time) gives `forward`'s logits,
    for the stacked cache [L, ...] with stacked params, for the per-layer Flax form, and for the sampler's
    decode weight format (with and without q/k/v and gate/up fused, in every weight format; the model has a tied
    head, so "in_out" also runs the transposed head copy). The decode formats also run a cache-less batch
    of more than `REDUCE_MAX_ROWS` rows, which "out_in_reduce" multiplies with dots instead."""
    import jax.numpy as jnp

    config, params = qwen3
    per_layer = layout != "stacked"
    if layout.startswith("decode-"):
        _, fusion, orientation = layout.split("-")
        weights = DecodeWeights(config, orientation, fuse=fusion == "fused")
        p = weights.convert(params)
        assert ("lm_head_w" in p) == (orientation == "in_out")
    else:
        weights = None
        p = {"stacked": params, "per-layer": decoder.unstack_layers(params)}[layout]
    rng = np.random.default_rng(4)
    full = rng.integers(1, config.vocab_size, (2, 9))
    pad = np.array([[1] * 9, [0, 0, 0] + [1] * 6])  # row 1 is left-padded by 3
    ref = np.asarray(models.forward(config, params, full, pad))
    cache = decoder.init_cache(config, 2, 12, jnp.float32, per_layer=per_layer)
    logits, cache = decoder.apply(config, p, full[:, :6], pad[:, :6], cache=cache, weights=weights)
    got = [np.asarray(logits)]
    for t in range(6, 9):
        logits, cache = decoder.apply(config, p, full[:, t:t + 1], pad[:, t:t + 1], cache=cache, weights=weights)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    real = pad.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=1e-4)
    assert int(cache["index"]) == 9
    if layout.startswith("decode-"):
        many = rng.integers(1, config.vocab_size, (4, 20))
        assert many.size > platform.REDUCE_MAX_ROWS
        logits, _ = decoder.apply(config, p, many, weights=weights)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(models.forward(config, params, many)),
                                   atol=1e-4, rtol=1e-4)


def test_decode_loop_updates_the_kv_cache_in_place(qwen3):
    """The compiled decode loop writes each step's keys / values into the loop-carried cache buffers; it
    never copies a whole layer cache per step (an earlier version did, 8 copies of the cache per step)."""
    import re

    config, params = qwen3
    sampler = sampling.Sampler(config, max_new_tokens=8)
    sampler.generate(params, _prompts(config.vocab_size), temperature=0.0, stop_at_eos=False)
    (_, decode), = sampler._executables.values()
    hlo = decode.as_text()
    (B, P), = sampler._caches.keys()
    cache_elems = B * config.num_key_value_heads * (P + 8) * config.head_dim
    copies = [m.group(1) for m in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} copy\(", hlo)]
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in copies]
    assert copies, "expected some (small) copies in the loop; the HLO pattern may have changed"
    assert cache_elems not in sizes, [c for c, n in zip(copies, sizes) if n == cache_elems]
