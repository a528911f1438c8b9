"""Numerical parity of the Flax decoder with PyTorch `transformers`, on tiny random checkpoints."""

import numpy as np
import pytest

from hf_fixtures import VARIANTS, build_hf_model, padded_batch, rel_err, torch_logits
from rwml_jax import models

LENGTHS = [11, 4, 9, 1]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    return request.param, path, build_hf_model(request.param, path)


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_float32_logits_match_torch(hf_model, left):
    name, path, torch_model = hf_model
    config, params = models.load_pretrained(path, dtype="float32")
    ids, mask = padded_batch(config.vocab_size, LENGTHS, left=left)
    ours = np.asarray(models.forward(config, params, ids, mask))
    ref = torch_logits(torch_model, ids, mask)
    assert ours.shape == ref.shape == (len(LENGTHS), max(LENGTHS), config.vocab_size)
    assert rel_err(ours, ref, mask) < 1e-4, name


def test_bfloat16_compute_within_tolerance(hf_model):
    name, path, torch_model = hf_model
    config, params = models.load_pretrained(path, dtype="float32", compute_dtype="bfloat16")
    ids, mask = padded_batch(config.vocab_size, LENGTHS, left=True, seed=1)
    ours = np.asarray(models.forward(config, params, ids, mask))
    assert ours.dtype == np.float32
    assert rel_err(ours, torch_logits(torch_model, ids, mask), mask) < 2e-2, name


def test_save_pretrained_round_trip(hf_model, tmp_path):
    import torch
    import transformers

    name, path, torch_model = hf_model
    config, params = models.load_pretrained(path)
    out = tmp_path / "saved"
    models.save_pretrained(config, params, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = padded_batch(config.vocab_size, LENGTHS, left=False, seed=2)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask), torch_logits(torch_model, ids, mask), rtol=0, atol=1e-5)
    # and our loader reads its own output back bit for bit
    config2, params2 = models.load_pretrained(out)
    assert config2 == config
    for a, b in zip(__import__("jax").tree.leaves(params), __import__("jax").tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
