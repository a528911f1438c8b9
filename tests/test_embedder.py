"""Embedding models in JAX against their PyTorch references (sentence-transformers, transformers)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rwml_jax.models import embedder as emb
from rwml_jax.models import load_embedder

MINILM = "minilm"

# Short, long, beyond max_seq_length (256 word pieces), punctuation / JSON, empty, whitespace, unicode.
VARIED = [
    "Nothing happens.",
    "You arrive at countertop 1. On the countertop 1, you see a apple 1, a bread 2, a butterknife 1, "
    "a dishsponge 3, a fork 2, a knife 1, a lettuce 1, a mug 2, a pan 1, a peppershaker 1, a plate 1, "
    "a pot 1, a potato 2, a saltshaker 1, a soapbottle 1, a spatula 2, a spoon 1, and a tomato 1.",
    " ".join(f"word{i % 37} is next to drawer {i % 11}." for i in range(200)),
    '{"type":"object","properties":{"customer_id":{"type":"string"},"orders":{"type":"array"}}} !!! ?? ...',
    "",
    "   leading and trailing spaces   ",
    "Ünïcödé çafé — naïve 中文 テキスト 🙂",
    "You pick up the mug 2 from the countertop 1.",
    "The fridge 1 is closed.",
]


@pytest.fixture(scope="module")
def minilm():
    return load_embedder(MINILM, batch_size=4)


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(emb.resolve_embedder_path(MINILM), device="cpu")


def test_minilm_matches_sentence_transformers(minilm, st_model):
    assert minilm.kind == "bert" and minilm.pooling_modes == ("mean",) and minilm.normalized_in_model
    assert minilm.max_length == 256 and minilm.dim == 384
    # the long row really is truncated (more word pieces than max_seq_length)
    assert len(st_model.tokenizer(VARIED[2])["input_ids"]) > 256
    ours = minilm.embed(VARIED)
    ref = st_model.encode(VARIED, convert_to_numpy=True)  # the folder has a Normalize module
    assert ours.shape == ref.shape == (len(VARIED), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_order_and_batching_do_not_change_results(minilm):
    a = minilm.embed(VARIED)
    b = minilm.embed(VARIED[::-1])[::-1]
    one = np.stack([minilm.embed([t])[0] for t in VARIED[:3]])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a[:3], one, atol=1e-5)
    assert minilm.embed([]).shape == (0, 384)


def test_bad_inputs_raise(minilm, tmp_path):
    with pytest.raises(TypeError, match="list of strings"):
        minilm.embed("a single string")
    with pytest.raises(TypeError, match="item 1"):
        minilm.embed(["ok", None])
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub name"):
        load_embedder(str(tmp_path / "nope"))
    bad = tmp_path / "t5"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(emb.EmbedderConfigError, match="model_type 't5'"):
        load_embedder(str(bad))
    st = tmp_path / "st"
    shutil.copytree(emb.resolve_embedder_path(MINILM), st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.LSTM"}]))
    with pytest.raises(emb.EmbedderConfigError, match="LSTM"):
        load_embedder(str(st))
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        load_embedder(MINILM, max_length=4096)


def test_bucketing_limits_shapes():
    lengths = {emb.bucket_length(n, 256) for n in range(1, 257)}
    assert max(lengths) == 256 and len(lengths) <= 24
    for n in range(1, 257):
        b = emb.bucket_length(n, 256)
        assert n <= b <= 256 and (b - n) < max(8, n / 8)
    assert emb.bucket_length(300, 256) == 256
    assert [emb.bucket_rows(n, 128, 1) for n in (1, 3, 8, 100, 128)] == [1, 4, 8, 128, 128]
    assert [emb.bucket_rows(n, 128, 8) for n in (1, 9, 128)] == [8, 16, 128]
    assert emb.bucket_rows(5, 6, 4) == 8  # batch size rounded up to the data-axis multiple


def test_plan_calls_covers_every_text_once_within_budget():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(20, 110, 1000), [256, 3, 1]])
    for multiple in (1, 8):
        calls = emb.plan_calls(lengths, batch_size=128, tokens_per_call=2048 * multiple, max_length=256,
                               multiple=multiple)
        seen = np.concatenate([idx for idx, _, _ in calls])
        assert sorted(seen) == list(range(len(lengths)))
        for idx, rows, seq in calls:
            assert len(idx) <= rows <= 128 and rows % multiple == 0
            assert rows * seq <= max(2048 * multiple, multiple * seq) and lengths[idx].max() <= seq
        shapes = {(rows, seq) for _, rows, seq in calls}
        assert len(shapes) <= 24
        full = [(idx, rows, seq) for idx, rows, seq in calls if len(idx) == rows]  # partial calls: odd texts
        assert len(full) >= len(calls) - 12
        padded = sum(rows * seq for _, rows, seq in full)
        assert padded / lengths[np.concatenate([i for i, _, _ in full])].sum() <= 1 / 0.8  # min_fill


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_pooling_matches_sentence_transformers_pooling(left):
    import torch
    from sentence_transformers.sentence_transformer.modules import Pooling

    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 6, 8)).astype(np.float32)
    lengths = [6, 2, 4]
    mask = np.zeros((3, 6), np.int64)
    for b, n in enumerate(lengths):
        if left:
            mask[b, 6 - n:] = 1
        else:
            mask[b, :n] = 1
    for mode in emb.POOLING_MODES:
        ref = Pooling(8, pooling_mode=mode)({"token_embeddings": torch.tensor(h),
                                             "attention_mask": torch.tensor(mask)})["sentence_embedding"]
        ours = np.asarray(emb.pool(h, mask, (mode,)))
        np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5, err_msg=mode)


# ---------------------------------------------------------------------------------------------------
# Decoder embedders (Qwen3-Embedding recipe) on a tiny random Qwen3
# ---------------------------------------------------------------------------------------------------

def _tiny_qwen3(path: str, seed: int = 0):
    """A bare Qwen3Model (as Qwen3-Embedding ships: no `model.` prefix, no lm_head) + a BERT tokenizer
    (its [SEP] plays the role of Qwen3-Embedding's appended <|endoftext|>)."""
    import torch
    import transformers

    cfg = transformers.Qwen3Config(vocab_size=30522, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                                   max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.Qwen3Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    model.save_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(emb.resolve_embedder_path(MINILM))
    tok.save_pretrained(path)
    return model, tok


def _torch_last_token(model, tok, texts: list[str]) -> np.ndarray:
    """Qwen3-Embedding's reference recipe: left padding, hidden state of the last position, L2 norm."""
    import torch

    tok.padding_side = "left"
    enc = tok(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state[:, -1]
    return torch.nn.functional.normalize(h, dim=-1).numpy()


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen3_embed"))
    model, tok = _tiny_qwen3(path)
    return path, model, tok


def test_qwen3_embedding_matches_pytorch_last_token(tiny_qwen3):
    path, model, tok = tiny_qwen3
    e = load_embedder(path, batch_size=4)
    assert e.kind == "decoder" and e.pooling_modes == ("lasttoken",) and e.dim == 64
    texts = VARIED[:2] + VARIED[3:]  # (the 2000-token row exceeds this toy model's 512 positions)
    ours = e.embed(texts)
    ref = _torch_last_token(model, tok, texts)
    cos = (ours * ref).sum(1)
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # the instruction prefix is Qwen3-Embedding's "Instruct: {task}\nQuery:{text}"
    task = "Given an observation, retrieve similar observations"
    ours_q = e.embed(texts[:3], instruction=task)
    ref_q = _torch_last_token(model, tok, [f"Instruct: {task}\nQuery:{t}" for t in texts[:3]])
    np.testing.assert_allclose(ours_q, ref_q, atol=1e-4)
    assert np.abs(ours_q - ours[:3]).max() > 1e-3  # the prefix matters
    # a default instruction given at load time applies to every call and changes the identity
    e_q = load_embedder(path, batch_size=4, instruction=task)
    np.testing.assert_allclose(e_q.embed(texts[:3]), ours_q, atol=1e-6)
    assert e_q.identity != e.identity


def test_sentence_transformers_decoder_folder(tiny_qwen3, tmp_path):
    """A Qwen3-Embedding-style sentence-transformers folder (lasttoken pooling + Normalize, named
    prompts) gives what sentence-transformers itself computes from it."""
    from sentence_transformers import SentenceTransformer

    path, model, tok = tiny_qwen3
    st = tmp_path / "st_qwen3"
    shutil.copytree(path, st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                              "pooling_mode_lasttoken": True}))
    (st / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    prompt = "Instruct: Given a query, retrieve relevant passages\nQuery:"
    (st / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": prompt, "document": ""},
                                                                      "default_prompt_name": None}))
    e = load_embedder(str(st), batch_size=8)
    assert e.max_length == 128 and e.prompts["query"] == prompt
    ref_model = SentenceTransformer(str(st), device="cpu")
    texts = [VARIED[0], VARIED[1], VARIED[3], VARIED[7]]
    np.testing.assert_allclose(e.embed(texts), ref_model.encode(texts), atol=1e-4)
    np.testing.assert_allclose(e.embed(texts, prompt_name="query"),
                               ref_model.encode(texts, prompt_name="query"), atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# The mesh: 8 forced CPU devices give the single-device result
# ---------------------------------------------------------------------------------------------------

_MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from rwml_jax.models import load_embedder
    from rwml_jax.sharding import make_mesh
    texts = json.loads(sys.argv[1])
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, shape in {"data8": (8, 1, 1), "data2_fsdp2_tensor2": (2, 2, 2)}.items():
        e = load_embedder("minilm", mesh=make_mesh(*shape), batch_size=8)
        leaf = e.params["backbone"]["layers"]["mlp_in_kernel"]
        out[name] = {"emb": e.embed(texts).tolist(), "param_spec": str(leaf.sharding.spec),
                     "n_shards": len({str(s.index) for s in leaf.addressable_shards})}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_eight_cpu_devices_equal_single_device(minilm):
    texts = VARIED[:7] + [f"You open the drawer {i}. The drawer {i} is open. In it, you see nothing." for i in range(6)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, json.dumps(texts)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    single = minilm.embed(texts)
    for name, res in out.items():
        np.testing.assert_allclose(np.asarray(res["emb"]), single, atol=2e-5, err_msg=name)
    # the tensor axis really splits the MLP kernel (logical axes -> mesh axes)
    assert "tensor" in out["data2_fsdp2_tensor2"]["param_spec"]
    assert out["data2_fsdp2_tensor2"]["n_shards"] > 1


# ---------------------------------------------------------------------------------------------------
# The realised-state cache
# ---------------------------------------------------------------------------------------------------

def test_embedding_cache_memory_and_disk(minilm, tmp_path):
    from rwml_jax.rwml.embed_cache import EmbeddingCache

    dataset = tmp_path / "triplets.jsonl"
    dataset.write_text("{}\n")
    texts = ["The fridge 1 is closed.", "You open the fridge 1.", "The fridge 1 is closed."]
    cache = EmbeddingCache.beside(dataset, minilm)
    assert cache.path.startswith(str(dataset) + ".embcache")
    v = cache.embed(texts)
    np.testing.assert_allclose(v, minilm.embed(texts), atol=1e-6)
    assert (cache.misses, cache.hits, len(cache)) == (2, 1, 2)
    cache.embed(texts[:2])
    assert cache.misses == 2 and cache.hits == 3
    # a new process (a new cache object) reads the vectors from disk without embedding
    again = EmbeddingCache.beside(dataset, minilm)
    assert len(again) == 2
    np.testing.assert_array_equal(again.embed(texts), v)
    assert again.misses == 0
    # new texts append a shard; compaction keeps every vector
    again.embed(["Nothing happens."])
    assert len(again._shards()) == 2
    again.compact()
    assert len(again._shards()) == 1 and len(EmbeddingCache.beside(dataset, minilm)) == 3
    # a damaged shard is ignored (and left in place), the good one still loads
    bad = os.path.join(again.path, "shard-99999999999999999999-0-0.npz")
    with open(bad, "wb") as f:
        f.write(b"not an npz")
    assert len(EmbeddingCache.beside(dataset, minilm)) == 3 and os.path.exists(bad)
    # another prompt is another cache folder
    assert EmbeddingCache.beside(dataset, minilm, prompt="Instruct: x\nQuery:").path != again.path
