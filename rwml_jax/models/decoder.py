"""Pure-functional Flax (linen) decoder for the Qwen2 / Qwen3 / Llama 3 families.

The model is `(config, params)`: `params` is a plain pytree of arrays, `apply` a pure function. Layers
are stacked with `nn.scan`, so every layer parameter has a leading `layers` axis and a 28-layer model
compiles like a 1-layer one. Every parameter carries logical axis names (see `param_logical_axes`) that
`rwml_jax.sharding` maps onto a device mesh.

Shapes: B batch, T new tokens, S key/value slots, E hidden, H query heads, K key/value heads,
G = H / K query heads per kv head, D head_dim, F SwiGLU width, V vocabulary, L layers.

KV cache (for the sampler): a dict
    k:     [L, B, K, D, S]   cached keys, transposed (`cache_dtype`); per-layer form: L arrays [B, K, D, S]
    v:     [L, B, K, S, D]   cached values; per-layer form: L arrays [B, K, S, D]
    mask:  [B, S] bool       which slots hold a real (non-pad) token
    pos:   [B] int32         RoPE position the next real token of each row gets
    index: [] int32          the first free slot (all rows advance together)
`apply` writes the T new tokens into slots [index, index + T) and returns the updated cache, updated with
`dynamic_update_slice`, so XLA updates it in place when the caller donates it. Both are heads-major, and
keys are stored transposed, so that a decode step's two attention products are plain batched matmuls over
the cache as it lies in memory: q [G, D] x k [D, S] and p [G, S] x v [S, D] per (row, kv head). With keys
as [S, D], XLA's CPU backend computed kᵀq and transposed the result (about 10 % of a `tiny` decode step).

Layer-unrolled form (for decoding): `unstack_layers(params)` turns the stacked `layers` subtree into a
tuple of per-layer subtrees, and `init_cache(..., per_layer=True)` gives per-layer cache arrays. `apply`
then runs the layers as straight-line code instead of a scan. Inside a decode loop this matters: a scan
slices every layer's weights (and cache) out of the stacked arrays on each step, and XLA materialises
those slices as copies (on CPU that copy traffic was about a quarter of a decode step). The sampler goes
one step further and converts to `rwml_jax.models.decode_layout` (per-layer, weights fused and in the
orientation the machine's skinny decode matmuls stream fastest), which `apply` runs as well.

Shared prefix (for GRPO groups, `apply(..., prefix=...)`, one-token decode steps with per-layer params):
rows b * n .. b * n + n - 1 continue the same prompt, whose keys and values sit once in a prefix
    k:    L arrays [Bp, K, D, P]   v: L arrays [Bp, K, P, D]   mask: [Bp, P] bool      (B = Bp * n)
and the cache holds only each row's own tokens (its `pos` already counts the prompt). Each step attends
over the P prefix slots and the row's own slots with one softmax; the prefix is read once per group
instead of once per row.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwml_jax.models.config import ModelConfig
from rwml_jax.models.rope import apply_rope, rope_tables

Params = Any  # nested dict of jax.Array
Cache = dict[str, jax.Array]

_NEG_INF = -1e30
_KERNEL_INIT = nn.initializers.normal(0.02)


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, accumulated in float32, returned in `x.dtype`."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * x32).astype(x.dtype)


class RMSNorm(nn.Module):
    config: ModelConfig
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            _dtype(self.config.param_dtype),
        )
        return rms_norm(x, scale, self.config.rms_norm_eps)


class Attention(nn.Module):
    """Grouped-query self-attention with optional q/k RMSNorm (Qwen3) and q/k/v(/o) bias."""

    config: ModelConfig

    def _proj(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...], bias: bool):
        c = self.config
        kernel = self.param(
            f"{name}_kernel", nn.with_logical_partitioning(_KERNEL_INIT, axes), shape, _dtype(c.param_dtype)
        )
        b = None
        if bias:
            out_axes = axes[1:] if name != "o" else axes[-1:]
            out_shape = shape[1:] if name != "o" else shape[-1:]
            b = self.param(
                f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros, out_axes), out_shape,
                _dtype(c.param_dtype),
            )
        return kernel, b

    @nn.compact
    def __call__(self, x, cos, sin, allowed, k_cache, v_cache, layer, index):
        """x [B, T, E] -> ([B, T, E], k_cache, v_cache).

        allowed: [B, T, S] bool, which key slots each query may attend to.
        k_cache, v_cache: the cache's k [L, B, K, D, S] and v [L, B, K, S, D] with `layer` the index into L,
          or one layer's k [B, K, D, S] and v [B, K, S, D] with `layer` None, or both None (no cache:
          S == T and the keys are this call's tokens).
        """
        c = self.config
        cdt = _dtype(c.compute_dtype)
        E, H, K, D = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        wq, bq = self._proj("q", (E, H, D), ("embed", "q_heads", "head_dim"), c.qkv_bias)
        wk, bk = self._proj("k", (E, K, D), ("embed", "kv_heads", "head_dim"), c.qkv_bias)
        wv, bv = self._proj("v", (E, K, D), ("embed", "kv_heads", "head_dim"), c.qkv_bias)
        wo, bo = self._proj("o", (H, D, E), ("q_heads", "head_dim", "embed"), c.o_bias)

        def dense(w, b, spec):
            y = jnp.einsum(spec, x, w.astype(cdt))
            return y if b is None else y + b.astype(cdt)

        q = dense(wq, bq, "bte,ehd->bthd")
        k = dense(wk, bk, "bte,ekd->btkd")
        v = dense(wv, bv, "bte,ekd->btkd")
        if c.qk_norm:
            q = RMSNorm(c, axis_name="head_dim", name="q_norm")(q)
            k = RMSNorm(c, axis_name="head_dim", name="k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        out, k_cache, v_cache = attend(q, k, v, allowed, k_cache, v_cache, layer, index)
        y = jnp.matmul(out, wo.astype(cdt).reshape(H * D, E))  # [B, T, E]
        if bo is not None:
            y = y + bo.astype(cdt)
        return y, k_cache, v_cache


def attend(q, k, v, allowed, k_cache, v_cache, layer, index, prefix=None):
    """Scaled dot-product attention of this call's queries over the cache (or over themselves).

    q: [B, T, H, D], k, v: [B, T, K, D] (after norms and RoPE, compute dtype); allowed: [B, T, S] bool.
    k_cache, v_cache, layer: as in `Attention` (None, None: no cache, S == T). The new keys / values are
    written into slots [index, index + T) first. prefix: None, or this layer's shared prefix (k [Bp, K, D, P],
    v [Bp, K, P, D], mask [Bp, P] bool) that rows b * n .. b * n + n - 1 attend to as well (one-token
    decode steps only; module docstring). Returns (out [B, T, H * D] in q's dtype, heads in
    (kv head, group) order, i.e. head h = kv_head * G + g; k_cache, v_cache).
    """
    B, T, H, D = q.shape
    K = k.shape[2]
    cdt = q.dtype
    q = q.reshape(B, T, K, H // K, D)
    if k_cache is None:
        k_spec = v_spec = "bskd"
    else:
        k_cache, v_cache = _write_cache(k_cache, v_cache, k, v, layer, index)
        k = (k_cache if layer is None else k_cache[layer]).astype(cdt)  # [B, K, D, S]
        v = (v_cache if layer is None else v_cache[layer]).astype(cdt)  # [B, K, S, D]
        k_spec, v_spec = "bkds", "bksd"
    if k_cache is not None and T == 1:
        # One-token decode step: per (row, kv head) a [G, D] x [D, S] and a [G, S] x [S, D] product,
        # written as batched dot_generals whose operands are already in that order.
        batch = ((0, 1), (0, 1))
        scores = jax.lax.dot_general(q[:, 0], k, (((3,), (2,)), batch), preferred_element_type=jnp.float32)
        scores = jnp.where(allowed[:, None], scores * (D**-0.5), _NEG_INF)  # [B, K, G, S]
        if prefix is None:
            probs = jax.nn.softmax(scores, axis=-1).astype(cdt)
            out = jax.lax.dot_general(probs, v, (((3,), (2,)), batch))  # [B, K, G, D]
        else:
            out = _attend_with_prefix(q[:, 0], scores, v, prefix)
    else:
        scores = jnp.einsum(f"btkgd,{k_spec}->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(allowed[:, None, None, :, :], scores * (D**-0.5), _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(cdt)
        out = jnp.einsum(f"bkgts,{v_spec}->btkgd", probs, v)
    return out.reshape(B, T, H * D), k_cache, v_cache


def _attend_with_prefix(q, scores, v, prefix):
    """One decode step over a shared prefix and the rows' own slots, one softmax over both.

    q: [B, K, G, D]; scores: [B, K, G, S] over the own slots (masked, scaled, float32); v: [B, K, S, D];
    prefix: (k [Bp, K, D, P], v [Bp, K, P, D], mask [Bp, P]) with B = Bp * n. The n rows of a prefix are
    folded into its query axis, so each prefix product is one [n * G, D] x [D, P] matmul per (prefix,
    kv head). Returns out [B, K, G, D] in q's dtype.
    """
    k_p, v_p, mask_p = prefix
    B, K, G, D = q.shape
    Bp, P = mask_p.shape
    n = B // Bp
    batch = ((0, 1), (0, 1))

    def fold(x):  # [B, K, G, X] -> [Bp, K, n * G, X]
        return x.reshape(Bp, n, K, G, -1).transpose(0, 2, 1, 3, 4).reshape(Bp, K, n * G, x.shape[-1])

    def unfold(x):  # [Bp, K, n * G, X] -> [B, K, G, X]
        return x.reshape(Bp, K, n, G, -1).transpose(0, 2, 1, 3, 4).reshape(B, K, G, x.shape[-1])

    s_p = jax.lax.dot_general(fold(q), k_p.astype(q.dtype), (((3,), (2,)), batch), preferred_element_type=jnp.float32)
    s_p = jnp.where(mask_p[:, None, None, :], s_p * (D**-0.5), _NEG_INF)  # [Bp, K, n * G, P]
    probs = jax.nn.softmax(jnp.concatenate([unfold(s_p), scores], axis=-1), axis=-1).astype(q.dtype)
    out = jax.lax.dot_general(probs[..., P:], v, (((3,), (2,)), batch))  # [B, K, G, D]
    out_p = jax.lax.dot_general(fold(probs[..., :P]), v_p.astype(q.dtype), (((3,), (2,)), batch))
    return out + unfold(out_p)


def _write_cache(k_cache, v_cache, k, v, layer, index):
    """Write this call's keys / values k, v [B, T, K, D] into cache slots [index, index + T).

    One layer's cache (layer None): keys [B, K, D, S], values [B, K, S, D]; the stacked cache has a leading
    L axis and `layer` picks the slice. Each cache is updated by one `dynamic_update_slice` on the array
    itself (no reshape around it), which XLA performs in place on a donated or loop-carried buffer.
    """
    zero = jnp.zeros((), jnp.int32)
    k_new = jnp.transpose(k, (0, 2, 3, 1)).astype(k_cache.dtype)  # [B, K, D, T]
    v_new = jnp.swapaxes(v, 1, 2).astype(v_cache.dtype)  # [B, K, T, D]
    if layer is None:
        return (jax.lax.dynamic_update_slice(k_cache, k_new, (zero, zero, zero, index)),
                jax.lax.dynamic_update_slice(v_cache, v_new, (zero, zero, index, zero)))
    return (jax.lax.dynamic_update_slice(k_cache, k_new[None], (layer, zero, zero, zero, index)),
            jax.lax.dynamic_update_slice(v_cache, v_new[None], (layer, zero, zero, index, zero)))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        cdt, pdt = _dtype(c.compute_dtype), _dtype(c.param_dtype)
        E, F = c.hidden_size, c.intermediate_size

        def dense(name, inp, shape, axes):
            w = self.param(f"{name}_kernel", nn.with_logical_partitioning(_KERNEL_INIT, axes), shape, pdt)
            y = inp @ w.astype(cdt)
            if c.mlp_bias:
                b = self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                               shape[1:], pdt)
                y = y + b.astype(cdt)
            return y

        gate = dense("gate", x, (E, F), ("embed", "mlp"))
        up = dense("up", x, (E, F), ("embed", "mlp"))
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return dense("down", h, (F, E), ("mlp", "embed"))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block; the scan body.

    carry = (x, k_cache, v_cache, layer); `layer` is None when the caches are one layer's (see Attention).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, cos, sin, allowed, index):
        x, k_cache, v_cache, layer = carry
        c = self.config
        h, k_cache, v_cache = Attention(c, name="attn")(
            RMSNorm(c, name="input_norm")(x), cos, sin, allowed, k_cache, v_cache, layer, index
        )
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c, name="post_attention_norm")(x))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return (x, k_cache, v_cache, None if layer is None else layer + 1), None


class Decoder(nn.Module):
    """Token ids -> final-norm hidden states [B, T, E] (and the updated KV cache)."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.embed = self.param(
            "embed",
            nn.with_logical_partitioning(_KERNEL_INIT, ("vocab", "embed")),
            (c.vocab_size, c.hidden_size),
            _dtype(c.param_dtype),
        )
        layer_cls = DecoderLayer
        if c.remat != "none":
            policy = None if c.remat == "full" else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False, policy=policy)
        self.layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, name="layers")
        self.final_norm = RMSNorm(c)
        if not c.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(_KERNEL_INIT, ("embed", "vocab")),
                (c.hidden_size, c.vocab_size),
                _dtype(c.param_dtype),
            )

    def __call__(self, input_ids, positions, allowed, k_cache, v_cache, index):
        c = self.config
        x = jnp.take(self.embed, input_ids, axis=0).astype(_dtype(c.compute_dtype))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        cos, sin = rope_tables(c, positions)
        (x, k_cache, v_cache, _), _ = self.layers(
            (x, k_cache, v_cache, jnp.zeros((), jnp.int32)), cos, sin, allowed, index
        )
        return self.final_norm(x), k_cache, v_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden [..., E] -> float32 logits [..., V]."""
        c = self.config
        cdt = _dtype(c.compute_dtype)
        w = self.embed.T if c.tie_word_embeddings else self.lm_head
        return jnp.matmul(hidden.astype(cdt), w.astype(cdt), preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------------
# Pure functional API
# ---------------------------------------------------------------------------------------------------

def _module(config: ModelConfig) -> Decoder:
    return Decoder(config)


def positions_from_mask(attention_mask: jax.Array, start: jax.Array | None = None) -> jax.Array:
    """RoPE positions [B, T] int32 that skip padding: the n-th real token of a row gets start + n."""
    mask = attention_mask.astype(jnp.int32)
    pos = jnp.cumsum(mask, axis=-1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return jnp.maximum(pos, 0)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (normal(0.02) kernels, unit norms, zero biases) as a plain pytree."""
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = _module(config).init(rng, ids, ids, jnp.ones((1, 1, 1), bool), None, None, jnp.zeros((), jnp.int32))
    return nn.unbox(variables["params"])


def param_logical_axes(config: ModelConfig) -> Params:
    """Pytree matching `params` whose leaves are `jax.sharding.PartitionSpec`s of logical axis names."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    abstract = jax.eval_shape(
        lambda r: _module(config).init(
            r, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 1), bool),
            None, None, jnp.zeros((), jnp.int32),
        ),
        jax.random.key(0),
    )
    del ids
    return nn.get_partition_spec(abstract["params"])


def param_shapes(config: ModelConfig) -> Params:
    """Pytree of `jax.ShapeDtypeStruct` for the parameters, without allocating them."""
    return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))


def init_cache(
    config: ModelConfig, batch: int, max_len: int, dtype: str | jnp.dtype | None = None, *, per_layer: bool = False
) -> Cache:
    """An empty KV cache with `max_len` slots per row (see module docstring for the layout).

    per_layer: k / v as tuples of L arrays [B, K, D, S] / [B, K, S, D] (for `unstack_layers` params)
    instead of one stacked [L, B, K, D, S] / [L, B, K, S, D] array each.
    """
    dtype = jnp.dtype(dtype or config.compute_dtype)
    L, K, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    if per_layer:
        k = tuple(jnp.zeros((batch, K, D, max_len), dtype) for _ in range(L))
        v = tuple(jnp.zeros((batch, K, max_len, D), dtype) for _ in range(L))
    else:
        k = jnp.zeros((L, batch, K, D, max_len), dtype)
        v = jnp.zeros((L, batch, K, max_len, D), dtype)
    return dict(
        k=k,
        v=v,
        mask=jnp.zeros((batch, max_len), bool),
        pos=jnp.zeros((batch,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def unstack_layers(params: Params) -> Params:
    """`params` with the stacked `layers` subtree split into a tuple of L per-layer subtrees.

    `apply` accepts either form; the per-layer form runs the layers unrolled (no per-step weight slicing
    inside decode loops). Under jit this is L slices per leaf, i.e. one copy of the layer weights.
    """
    if isinstance(params["layers"], (tuple, list)):
        return params
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    out = dict(params)
    out["layers"] = tuple(jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(n))
    return out


def _run_layers_unrolled(config, params, input_ids, positions, allowed, k_cache, v_cache, index, prefix=None):
    """Decoder.__call__ for per-layer params / caches: the same DecoderLayer, as straight-line code
    (decode-layout layers also attend to a shared `prefix`, see `apply`)."""
    c = config
    x = jnp.take(params["embed"], input_ids, axis=0).astype(_dtype(c.compute_dtype))
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    cos, sin = rope_tables(c, positions)
    from rwml_jax.models import decode_layout  # it builds on this module's attention

    layer = DecoderLayer(c)
    new_k, new_v = [], []
    for i, layer_params in enumerate(params["layers"]):
        kc = None if k_cache is None else k_cache[i]
        vc = None if v_cache is None else v_cache[i]
        if decode_layout.is_decode_layout(layer_params):
            lprefix = None if prefix is None else (prefix["k"][i], prefix["v"][i], prefix["mask"])
            x, kc, vc = decode_layout.layer(c, layer_params, x, cos, sin, allowed, kc, vc, index, lprefix)
        elif prefix is not None:
            raise ValueError("a shared prefix needs params in the sampler's decode layout (decode_layout.from_stacked)")
        else:
            (x, kc, vc, _), _ = layer.apply({"params": layer_params}, (x, kc, vc, None), cos, sin, allowed, index)
        if kc is not None:
            new_k.append(kc)
            new_v.append(vc)
    hidden = rms_norm(x, params["final_norm"]["scale"], c.rms_norm_eps)
    if k_cache is None:
        return hidden, None, None
    return hidden, tuple(new_k), tuple(new_v)


def apply(
    config: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    cache: Cache | None = None,
    return_hidden: bool = False,
    prefix: Cache | None = None,
) -> tuple[jax.Array, Cache | None]:
    """Run the decoder on `input_ids` [B, T].

    attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right). Defaults to all ones.
    positions: [B, T] RoPE positions; by default the count of real tokens before each one (plus the
      cache's `pos` when a cache is given), so left-padded rows start at position 0.
    cache: a KV cache from `init_cache`; the new tokens go to slots [index, index + T).
    params may be stacked (from `init_params` / `load_pretrained`) or per-layer (`unstack_layers`, or
    `decode_layout.from_stacked`); a per-layer params tree needs a per-layer cache
    (`init_cache(..., per_layer=True)`) and vice versa.
    prefix: a shared prefix (module docstring) for one-token decode steps (T == 1) with a cache and
      decode-layout params; the cache then holds the rows' own tokens only.
    Returns (logits [B, T, V] float32, or final-norm hidden [B, T, E] when `return_hidden`;
    the updated cache or None).
    """
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), bool)
    attention_mask = attention_mask.astype(bool)
    model = _module(config)
    if cache is None:
        if positions is None:
            positions = positions_from_mask(attention_mask)
        slot = jnp.arange(T)
        allowed = (slot[None, :] <= slot[:, None])[None] & attention_mask[:, None, :]
        k_cache = v_cache = None
        index = jnp.zeros((), jnp.int32)
    else:
        index = cache["index"]
        if positions is None:
            positions = positions_from_mask(attention_mask, cache["pos"])
        kv_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (jnp.zeros((), jnp.int32), index))
        S = kv_mask.shape[1]
        q_slot = index + jnp.arange(T)
        allowed = (jnp.arange(S)[None, :] <= q_slot[:, None])[None] & kv_mask[:, None, :]
        k_cache, v_cache = cache["k"], cache["v"]

    unrolled = isinstance(params["layers"], (tuple, list))
    if prefix is not None and (cache is None or T != 1 or not unrolled):
        raise ValueError("a shared prefix is for one-token decode steps with a per-layer cache and per-layer params")
    if cache is not None and unrolled != isinstance(k_cache, (tuple, list)):
        raise ValueError(
            "params and cache disagree on the layer layout: per-layer params (unstack_layers) need "
            "init_cache(..., per_layer=True), stacked params need a stacked cache"
        )
    if unrolled:
        hidden, k_cache, v_cache = _run_layers_unrolled(
            config, params, input_ids, positions, allowed, k_cache, v_cache, index, prefix
        )
    else:
        hidden, k_cache, v_cache = model.apply(
            {"params": params}, input_ids, positions, allowed, k_cache, v_cache, index
        )
    new_cache = None
    if cache is not None:
        new_cache = dict(
            k=k_cache,
            v=v_cache,
            mask=kv_mask,
            pos=cache["pos"] + attention_mask.sum(-1, dtype=jnp.int32),
            index=index + T,
        )
    if return_hidden:
        return hidden, new_cache
    return lm_logits(config, params, hidden), new_cache


def lm_logits(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """Final-norm hidden states [..., E] -> float32 logits [..., V] (tied or untied head; params in the
    sampler's decode layout go to `decode_layout.lm_logits`, which knows its weight formats)."""
    layers = params.get("layers")
    if isinstance(layers, (tuple, list)) and layers:
        from rwml_jax.models import decode_layout  # it builds on this module

        if decode_layout.is_decode_layout(layers[0]):
            return decode_layout.lm_logits(config, params, hidden)
    return flax_lm_logits(config, params, hidden)


def flax_lm_logits(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """`Decoder.logits` on the `embed` / `lm_head` entries of params (stacked, per-layer or decode layout)."""
    head = {k: params[k] for k in ("embed", "lm_head") if k in params}
    return _module(config).apply({"params": head}, hidden, method=Decoder.logits)


def forward(
    config: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
    """Logits [B, T, V] (float32) for a right- or left-padded batch; see `apply`."""
    logits, _ = apply(config, params, jnp.asarray(input_ids), None if attention_mask is None else jnp.asarray(attention_mask))
    return logits
