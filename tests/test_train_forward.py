"""The training forward's execution options (fused weights, layer loop, remat) give the reference forward's
values and gradients for every family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import VARIANTS, build_hf_model, padded_batch

from rwml_jax import platform
from rwml_jax.models import decoder
from rwml_jax.models.block import ParamWeights
from rwml_jax.models.hf_io import load_pretrained

REFERENCE = platform.ExecutionConfig()  # a scan over layers, no remat


def hidden_states(cfg, params, ids, mask, *, fuse=True, remat="none", loop="auto"):
    """The training forward: fused weights and the execution config `platform.resolve` gives."""
    ex = platform.resolve(cfg, remat=remat, layer_loop=loop)
    return decoder.apply(cfg, params, ids, mask, return_hidden=True, weights=ParamWeights(cfg, fuse), execution=ex)[0]


def reference(cfg, params, ids, mask):
    return decoder.apply(cfg, params, ids, mask, return_hidden=True, weights=ParamWeights(cfg, fuse=False),
                         execution=REFERENCE)[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name in VARIANTS:
        path = str(tmp_path_factory.mktemp(name))
        build_hf_model(name, path)
        out[name] = path
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hidden_states_equal_decoder(checkpoints, variant):
    cfg, params = load_pretrained(checkpoints[variant])
    ids, mask = padded_batch(cfg.vocab_size, [9, 4, 7], left=variant.startswith("qwen3"), seed=1)
    want = np.asarray(jax.jit(lambda p, i, m: reference(cfg, p, i, m))(params, ids, mask))
    real = mask.astype(bool)
    for fuse in (True, False) if variant in ("qwen2-gqa-untied", "llama3-scaled") else (True,):
        for loop in ("scan", "unroll") if variant == "qwen2-gqa-untied" else ("auto",):
            got = np.asarray(jax.jit(lambda p, i, m: hidden_states(cfg, p, i, m, fuse=fuse, loop=loop))(params, ids, mask))
            np.testing.assert_allclose(got[real], want[real], rtol=2e-5, atol=2e-5, err_msg=f"fuse={fuse} {loop}")


def test_layer_loop_is_checked_and_auto_unrolls_small_models_on_cpu(checkpoints):
    cfg, _ = load_pretrained(checkpoints["qwen2-gqa-untied"])
    with pytest.raises(ValueError, match="layer_loop='loop'; expected one of"):
        platform.resolve(cfg, layer_loop="loop")

    def unrolls_layers(c, loop="auto"):
        return platform.resolve(c, layer_loop=loop).unroll_layers

    assert unrolls_layers(cfg) == (jax.default_backend() == "cpu")
    assert not unrolls_layers(cfg.replace(num_hidden_layers=13))
    assert unrolls_layers(cfg.replace(num_hidden_layers=28), "unroll")
    assert not unrolls_layers(cfg, "scan")


@pytest.mark.parametrize("variant,remat,loop", [("qwen2-gqa-untied", "none", "unroll"),
                                                ("llama-mqa-tied-oddhd", "full", "scan"),
                                                ("qwen3-bias", "dots", "unroll"), ("qwen3-bias", "none", "scan")])
def test_gradients_equal_decoder(checkpoints, variant, remat, loop):
    cfg, params = load_pretrained(checkpoints[variant])
    ids, mask = padded_batch(cfg.vocab_size, [8, 5, 3, 8], left=True, seed=2)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(*ids.shape, cfg.hidden_size)), jnp.float32)
    w = w * jnp.asarray(mask)[..., None]  # padding slots do not contribute

    def loss(fn):
        return lambda p: jnp.sum(fn(p) * w)

    want = jax.jit(jax.grad(loss(lambda p: reference(cfg, p, ids, mask))))(params)
    got = jax.jit(jax.grad(loss(lambda p: hidden_states(cfg, p, ids, mask, remat=remat, loop=loop))))(params)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        err = float(jnp.abs(g - r).max() / jnp.maximum(jnp.abs(r).max(), 1e-30))  # lm_head: both 0
        assert err < 1e-4, f"{jax.tree_util.keystr(path)}: {err:.2e}"
