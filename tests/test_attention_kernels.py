"""Every attention kernel gives the XLA path's outputs and gradients, with every mask the stages use.

- "cudnn" is `jax.nn.dot_product_attention` with our masks: on a CPU it runs JAX's reference implementation
  of that call (the masks and layouts under test are the same); on an NVIDIA GPU also cuDNN itself
  (bfloat16), which `launch/gpu_check.sh` runs.
- "splash" is the Pallas TPU kernel, in interpret mode off a TPU.
Outputs at padded query slots are unspecified, so the comparisons and the losses read real tokens only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import build_hf_model

from rwml_jax import platform
from rwml_jax.models import attention, attention_kernels, decoder
from rwml_jax.models.hf_io import load_pretrained
from rwml_jax.rl import shared_prompt

# (implementation, dtype, tolerance) of the cuDNN-call checks: the reference implementation everywhere,
# cuDNN itself where there is a GPU
DOT_PRODUCT = [("xla", jnp.float32, 2e-5)] + (
    [("cudnn", jnp.bfloat16, 3e-2)] if jax.default_backend() == "gpu" else [])


def qkv(B, T, S, H=4, K=2, D=16, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s), dtype) for s in ((B, T, H, D), (B, S, K, D), (B, S, K, D)))


def masks(B, T, seed):
    """Right-padded rows, left-padded rows and a full row: [B, T] bool."""
    r = np.random.default_rng(seed)
    m = np.ones((B, T), bool)
    for b in range(B - 1):
        n = int(r.integers(T // 3, T))
        m[b] = np.arange(T) < n if b % 2 == 0 else np.arange(T) >= T - n
    return jnp.asarray(m)


def causal_pattern(mask):
    T = mask.shape[1]
    return attention_kernels.Pattern(np.tril(np.ones((T, T), bool)), mask, mask)


def grouped_pattern(p_mask, c_mask):
    """The completions' pattern of `attention.grouped_prompt`: prompt then own earlier tokens."""
    bp, P = p_mask.shape
    G, C = c_mask.shape[1:]
    static = np.concatenate([np.ones((C, P), bool), np.tril(np.ones((C, C), bool))], axis=1)
    return attention_kernels.Pattern(static, c_mask.reshape(bp * G, C),
                                     jnp.concatenate([jnp.repeat(p_mask, G, 0), c_mask.reshape(bp * G, C)], 1))


def value_and_grads(fn, q, k, v, real):
    """fn(q, k, v) -> o [B, T, H, D]; the output and the gradients of a fixed masked functional."""
    w = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)

    def loss(q, k, v):
        o = fn(q, k, v).astype(jnp.float32)
        return jnp.sum(jnp.where(real[:, :, None, None], o * w, 0.0))

    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def assert_close(got, want, real, tol):
    (o, grads), (o_ref, grads_ref) = got, want
    real = np.asarray(real)
    np.testing.assert_allclose(np.asarray(o, np.float32)[real], np.asarray(o_ref, np.float32)[real], rtol=tol, atol=tol)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=tol, atol=tol,
                                   err_msg=f"d{name}")


def xla_reference(q, k, v, pattern):
    return attention._attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), pattern, "xla")


@pytest.mark.parametrize("impl,dtype,tol", DOT_PRODUCT)
@pytest.mark.parametrize("kind", ["causal", "grouped_completions", "cross"])
def test_dot_product_matches_xla(impl, dtype, tol, kind):
    if kind == "causal":
        mask = masks(4, 24, seed=1)
        pattern, (q, k, v) = causal_pattern(mask), qkv(4, 24, 24, dtype=dtype)
    elif kind == "grouped_completions":
        p_mask = masks(2, 16, seed=2)
        c_mask = jnp.asarray(np.arange(8)[None, None] < np.array([[3, 8, 5], [8, 1, 6]])[..., None])
        pattern, (q, k, v) = grouped_pattern(p_mask, c_mask), qkv(6, 8, 24, dtype=dtype)
    else:  # any static pattern, e.g. a block-diagonal one, with padding
        static = np.kron(np.eye(3, dtype=bool), np.ones((4, 4), bool))
        pattern = attention_kernels.Pattern(static, masks(3, 12, seed=3), masks(3, 12, seed=4))
        q, k, v = qkv(3, 12, 12, dtype=dtype)
    real = pattern.q_real
    got = value_and_grads(lambda q, k, v: attention_kernels.dot_product(q, k, v, pattern, impl), q, k, v, real)
    want = value_and_grads(lambda q, k, v: xla_reference(q, k, v, pattern), q, k, v, real)
    assert_close(got, want, real, tol)


@pytest.mark.parametrize("kind", ["causal", "grouped_completions"])
def test_splash_matches_xla(kind):
    """Lengths that are not multiples of the kernel's block (padded inside), GQA, padding on both sides."""
    if kind == "causal":
        mask = masks(3, 40, seed=5)
        pattern, (q, k, v) = causal_pattern(mask), qkv(3, 40, 40, seed=1)
    else:
        p_mask = masks(2, 20, seed=6)
        c_mask = jnp.asarray(np.arange(12)[None, None] < np.array([[3, 12], [7, 1]])[..., None])
        pattern, (q, k, v) = grouped_pattern(p_mask, c_mask), qkv(4, 12, 32, seed=2)
    real = pattern.q_real
    got = value_and_grads(lambda q, k, v: attention_kernels.splash(q, k, v, pattern), q, k, v, real)
    want = value_and_grads(lambda q, k, v: xla_reference(q, k, v, pattern), q, k, v, real)
    assert_close(got, want, real, 2e-5)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="attention='flash'"):
        platform.ExecutionConfig(attention="flash")
    with pytest.raises(ValueError, match="attention='flash'"):
        platform.resolve(None, attention="flash")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen3"))
    build_hf_model("qwen3-gqa-tied-oddhd", path)
    return load_pretrained(path)


def test_decoder_and_grouped_update_forward_run_splash(tiny_model):
    """The decoder's causal forward and the GRPO update's grouped-prompt forward, through the splash
    kernel, give the XLA kernel's hidden states and parameter gradients."""
    cfg, params = tiny_model
    xla = platform.resolve(cfg)
    assert xla.attention == "xla"  # the CPU default
    splash = dataclasses.replace(xla, attention="splash")
    r = np.random.default_rng(0)
    ids = jnp.asarray(r.integers(0, cfg.vocab_size, (3, 20)), jnp.int32)
    mask = masks(3, 20, seed=8)

    def causal_loss(p, ex):
        h = decoder.apply(cfg, p, ids, mask, return_hidden=True, execution=ex)[0]
        return jnp.sum(jnp.where(mask[..., None], h, 0.0) ** 2), h

    p_mask = jnp.asarray(np.arange(10)[None] >= np.array([[3], [0]]))  # left-padded prompts, as packed
    c_mask = jnp.asarray(np.arange(6)[None, None] < np.array([[2, 6, 4], [6, 1, 5]])[..., None])
    gbatch = dict(prompt_ids=ids[:2, :10], prompt_mask=p_mask, completion_mask=c_mask,
                  completion_ids=jnp.asarray(r.integers(0, cfg.vocab_size, (2, 3, 6)), jnp.int32))

    def grouped_loss(p, ex):
        h, _, m = shared_prompt.completion_hidden(cfg, p, gbatch, execution=ex)
        return jnp.sum(jnp.where(m[..., None], h, 0.0) ** 2), h

    for loss in (causal_loss, grouped_loss):
        (_, h_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(params, xla)
        (_, h), g = jax.value_and_grad(loss, has_aux=True)(params, splash)
        real = np.asarray(mask if loss is causal_loss else c_mask.reshape(6, 6))
        np.testing.assert_allclose(np.asarray(h)[real], np.asarray(h_ref)[real], rtol=1e-4, atol=1e-4)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5),
                     g, g_ref)
