"""Checkpoint I/O: sharded files, loading into a mesh, and the errors bad folders produce."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from hf_fixtures import build_hf_model, padded_batch, torch_logits
from rwml_jax import models
from rwml_jax.models.safetensors_io import SafetensorsFile, save_file


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen3"))
    return path, build_hf_model("qwen3-gqa-tied-oddhd", path)


def test_sharded_checkpoint_round_trip(qwen3_dir, tmp_path):
    path, torch_model = qwen3_dir
    config, params = models.load_pretrained(path)
    models.save_pretrained(config, params, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    config2, params2 = models.load_pretrained(tmp_path)
    ids, mask = padded_batch(config.vocab_size, [7, 3], left=True)
    ours = np.asarray(models.forward(config2, params2, ids, mask))
    ref = torch_logits(torch_model, ids, mask)
    m = mask.astype(bool)
    assert np.abs(ours[m] - ref[m]).max() / np.abs(ref[m]).max() < 1e-4


def test_bfloat16_params_load_and_save(qwen3_dir, tmp_path):
    path, _ = qwen3_dir
    config, params = models.load_pretrained(path, dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    models.save_pretrained(config, params, tmp_path)
    f = SafetensorsFile(tmp_path / "model.safetensors")
    assert f["model.embed_tokens.weight"].dtype.name == "bfloat16"


def test_unknown_model_type_names_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(models.UnsupportedModelError, match=r"gpt2.*qwen2, qwen3, llama"):
        models.load_pretrained(tmp_path)


def test_missing_config_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json.*safetensors"):
        models.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        models.load_pretrained(tmp_path / "nope")


def test_missing_and_misshaped_tensors_are_named(qwen3_dir, tmp_path):
    path, _ = qwen3_dir
    src = SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {k: np.array(src[k]) for k in src}
    cfg = open(os.path.join(path, "config.json")).read()

    bad = dict(tensors)
    del bad["model.layers.1.mlp.up_proj.weight"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(cfg)
    save_file(bad, tmp_path / "a" / "model.safetensors")
    with pytest.raises(models.CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        models.load_pretrained(tmp_path / "a")

    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = bad["model.layers.0.self_attn.k_proj.weight"][:-1]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(cfg)
    save_file(bad, tmp_path / "b" / "model.safetensors")
    with pytest.raises(models.CheckpointError, match=r"k_proj.weight' has shape \(47, 48\).*implies \(48, 48\)"):
        models.load_pretrained(tmp_path / "b")


def test_no_weights_file_is_reported(qwen3_dir, tmp_path):
    path, _ = qwen3_dir
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.load_pretrained(tmp_path)


def test_load_into_mesh_on_8_devices_matches_single_device(qwen3_dir):
    """Parameters placed straight into (data=2, fsdp=2, tensor=2) shardings give the same logits."""
    path, _ = qwen3_dir
    script = textwrap.dedent(f"""
        import numpy as np, jax
        from rwml_jax import models, sharding
        from hf_fixtures import padded_batch
        mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
        config, params = models.load_pretrained({path!r}, mesh=mesh)
        q = params["layers"]["attn"]["q_kernel"]
        assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[1:3] == (24, 2), q.sharding
        ids, mask = padded_batch(config.vocab_size, [9, 4, 6, 2], left=True)
        with mesh, sharding.axis_rules():
            out = jax.jit(models.forward, static_argnums=0)(config, params, ids, mask)
        np.save({os.path.join(path, "sharded.npy")!r}, np.asarray(out))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=600)
    config, params = models.load_pretrained(path)
    ids, mask = padded_batch(config.vocab_size, [9, 4, 6, 2], left=True)
    ref = np.asarray(models.forward(config, params, ids, mask))
    np.testing.assert_allclose(np.load(os.path.join(path, "sharded.npy")), ref, rtol=1e-5, atol=1e-5)
