"""Library attention kernels for the cache-less strategies (training and full forward passes).

Every kernel computes the same thing as the XLA core in `rwml_jax.models.attention`:

    o = softmax(q k^T / sqrt(D) + mask) v,   q [B, T, H, D], k, v [B, S, K, D] -> o [B, T, H, D]

over a `Pattern`: a position pattern shared by every row (`static` [T, S] bool, e.g. causal) and the real
tokens of each row (`q_real` [B, T], `kv_real` [B, S] bool). Query t of row b may read key s when
static[t, s] and kv_real[b, s]. Outputs at padded query slots are unspecified (each kernel fills them
differently); callers mask them, as the losses do.

- `dot_product`: `jax.nn.dot_product_attention`, cuDNN's flash attention on NVIDIA GPUs
  (`implementation="cudnn"`, bfloat16 / float16 only). A causal `static` becomes cuDNN's causal mask type
  and the padding a key mask; any other pattern a dense [B, 1, T, S] mask. `implementation="xla"` runs the
  same call through JAX's reference implementation (how the CPU tests check the masks).
- `splash`: the Pallas splash attention kernel shipped with JAX for TPUs, one multi-query kernel per
  (row, kv head) over its G query heads; `static` becomes a `NumpyMask` (the kernel skips the blocks it
  rules out) and the padding segment ids (real = 1, padding = 0), so a padded query reads padded keys and
  no query row is empty. Sequences are padded up to the kernel's block size. Off a TPU the kernel runs in
  Pallas interpret mode (the CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

SPLASH_BLOCK = 128  # the splash kernel's tile (query and key blocks, forward and backward)


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Which keys each query may read: static [T, S] bool (numpy, shared by every row) and the real
    tokens q_real [B, T], kv_real [B, S] (bool)."""

    static: np.ndarray
    q_real: jax.Array
    kv_real: jax.Array

    @property
    def is_causal(self) -> bool:
        T, S = self.static.shape
        return T == S and bool(np.array_equal(self.static, np.tril(np.ones((T, S), bool))))

    def allowed(self) -> jax.Array:
        """[B, T, S] bool: the dense mask."""
        return jnp.asarray(self.static)[None] & self.kv_real.astype(bool)[:, None, :]


def dot_product(q: jax.Array, k: jax.Array, v: jax.Array, pattern: Pattern,
                implementation: str | None = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` over `pattern`; q [B, T, H, D] unscaled, k, v [B, S, K, D]."""
    if pattern.is_causal:
        mask = pattern.kv_real.astype(bool)[:, None, None, :]  # [B, 1, 1, S]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=pattern.allowed()[:, None], implementation=implementation)


def _pad_to(x: jax.Array, n: int, axis: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad)


@functools.cache
def _splash_kernel(static_bytes: bytes, shape: tuple[int, int], heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    static = np.frombuffer(static_bytes, bool).reshape(shape)
    mask = sm.MultiHeadMask([sm.NumpyMask(static) for _ in range(heads)])
    b = SPLASH_BLOCK
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sk.make_splash_mqa_single_device(mask, block_sizes=blocks, interpret=interpret)


def splash(q: jax.Array, k: jax.Array, v: jax.Array, pattern: Pattern) -> jax.Array:
    """The splash kernel over `pattern`; q [B, T, H, D] unscaled, k, v [B, S, K, D] -> [B, T, H, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    Tp, Sp = -(-T // SPLASH_BLOCK) * SPLASH_BLOCK, -(-S // SPLASH_BLOCK) * SPLASH_BLOCK
    static = np.zeros((Tp, Sp), bool)
    static[:T, :S] = pattern.static
    static[T:, :] = True  # padded query slots (segment 0) read the padded keys: no empty row
    kernel = _splash_kernel(static.tobytes(), static.shape, G, jax.default_backend() != "tpu")
    qs = (q * jnp.asarray(D**-0.5, q.dtype)).reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
    qs, ks, vs = _pad_to(qs, Tp, 3), _pad_to(ks, Sp, 2), _pad_to(vs, Sp, 2)
    seg = sk.SegmentIds(q=_pad_to(pattern.q_real.astype(jnp.int32), Tp, 1),
                        kv=_pad_to(pattern.kv_real.astype(jnp.int32), Sp, 1))
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads
    out = jax.vmap(per_head, in_axes=(0, 0, 0, sk.SegmentIds(0, 0)))(qs, ks, vs, seg)  # [B, K, G, Tp, D]
    return out[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
