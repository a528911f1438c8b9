"""The sampler's parameter layout: per-layer, q/k/v and gate/up fused, weights in the orientation (and
multiplied by the kind of product) that the machine's kernels stream fastest.

A decode step multiplies B (~16-64) rows by every weight matrix, so it streams the weights from memory
once per generated token, and one product over a fused q/k/v (or gate/up) weight beats three (or two)
separate ones. Which of the three weight formats streams fastest depends on the machine and on whether
the weights fit in its last-level cache (`default_orientation`):
- "out_in_reduce" ([out, in]; keys end in `_r`): a product of at most `REDUCE_MAX_ROWS` rows is written
  as an element-wise product summed over `in` (`sum(w[None] * x[:, None], -1)`), which XLA:CPU hands to
  YNNPACK's reduction kernel. A GEMM packs (copies) its weight operand before multiplying; for a skinny
  product whose weights stream from DRAM every step that copy is as much traffic as the product, and the
  reduction streams the weights once. On an AMD Zen 4 (2 threads), against XLA's dot with the weight
  [in, out]: [16, 768] x [768, 4096] 0.92 vs 1.18 ms, [16, 2048] x [2048, 768] 0.46 vs 0.65 ms, the tied
  `small` head [16, 768] x [768, 32000] 7.4 vs 10.3 ms, qwen3-0.6b's [16, 1024] x [1024, 151936] 32 vs
  48 ms; break-even at ~128 rows, so more rows (a prefill) use a dot_general like "out_in". The `small`
  decode step 41.9 vs 50.3 ms with "in_out" (whole generate calls 1.10-1.14x); `tiny`, whose weights stay
  in the 32 MB L3, 0.86-0.92x (slower), so it keeps a dot format.
  The tied head multiplies by the embedding itself (already [V, E]), so this format adds no copy of it.
- "in_out" ([in, out], the Flax orientation; keys end in `_w`): on an AMD Zen 4 with AVX-512, XLA's
  [16, 768] x [768, 4096] product ran at 109 GFLOP/s this way against 62 GFLOP/s as [out, in], the
  tied `small` LM head [16, 768] x [768, 32000] in 8.1 against 10.8 ms, and whole `tiny` / `small`
  generation 1.15x faster in interleaved A/Bs;
- "out_in" ([out, in], the `torch.nn.Linear` orientation, contracted on the last axis; keys end in `_t`):
  on an earlier AVX2-only machine the same products ran at 5-7 GB/s this way against 3-4 GB/s as
  [in, out]. It is also the choice off the CPU (the GPU figures in the README were measured with it).
Training keeps the Flax layout of `rwml_jax.models.decoder` ([in, out], heads as separate axes); the
sampler converts once per call (`from_stacked`, one copy of the layer weights, the same cost as
`decoder.unstack_layers`).

Per-layer subtree (E hidden, H / K query / kv heads, D head_dim, F SwiGLU width), shown for "out_in";
"in_out" stores the transpose of each `*_t` weight under `*_w` instead, "out_in_reduce" the same array
under `*_r`:
    input_norm [E], post_attention_norm [E], q_norm [D], k_norm [D] (qk-norm models only)
    fused:     qkv_t [(H + 2K) * D, E], gate_up_t [2F, E]    (when the mesh's tensor axis is 1)
    unfused:   q_t [H * D, E], k_t / v_t [K * D, E], gate_t / up_t [F, E]
    o_t [E, H * D], down_t [E, F]
    biases where the model has them: qkv_bias [(H + 2K) * D] (or q_bias, k_bias, v_bias), o_bias [E],
    gate_up_bias [2F] (or gate_bias, up_bias), down_bias [E]
The top level keeps `embed`, `final_norm` and `lm_head` as they are (an untied `lm_head` is already
[E, V]; a tied head multiplies by the [V, E] embedding on its last axis). "in_out" with a tied head adds
`lm_head_w` [E, V], a transposed copy of the embedding; "out_in_reduce" with an untied head stores it as
`lm_head_r` [V, E] instead of `lm_head` (`lm_logits` below; `decoder.lm_logits` calls it).
`decoder.apply` runs such params through `layer` below; its numbers equal the Flax layer's up to float
rounding.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rwml_jax.models.config import ModelConfig
from rwml_jax.models.decoder import attend, flax_lm_logits, param_logical_axes, rms_norm, unstack_layers
from rwml_jax.models.rope import apply_rope

Params = Any
ORIENTATIONS = ("out_in", "in_out", "out_in_reduce")
REDUCE_MAX_ROWS = 64  # "out_in_reduce": products with more rows than this (prefill) run as a dot_general
_SUFFIX = {"out_in": "_t", "in_out": "_w", "out_in_reduce": "_r"}
_DEFAULT_LLC_BYTES = 32 * 2**20


@functools.cache
def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


@functools.cache
def _last_level_cache_bytes() -> int:
    """The largest CPU cache of cpu0 in bytes (sysfs), or 32 MiB where sysfs does not say."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    sizes = []
    try:
        for entry in os.listdir(root):
            try:
                with open(os.path.join(root, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
            sizes.append(int(text.rstrip("KMGkmg")) * unit)
    except (OSError, ValueError):
        return _DEFAULT_LLC_BYTES
    return max(sizes) if sizes else _DEFAULT_LLC_BYTES


@functools.cache
def _cpu_reduce_is_library_kernel() -> bool:
    """Whether this XLA:CPU build hands a skinny multiply-and-sum to a library kernel (YNNPACK) instead
    of its own loop emitter, which is no faster than the dot."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        return False
    x = jax.ShapeDtypeStruct((16, 256), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(cpu))
    w = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(cpu))
    text = jax.jit(_reduce_product).lower(x, w).compile().as_text()
    return "ynn_fusion" in text


def weight_bytes(config: ModelConfig) -> int:
    """Bytes of the weights one decode step reads (every parameter, in `param_dtype`)."""
    return config.num_params * jnp.dtype(config.param_dtype).itemsize


def default_orientation(devices: Any, config: ModelConfig | None = None) -> str:
    """The weight format for `devices` (and, on a CPU, for `config`'s size); see the module docstring.

    - not all devices CPUs: "out_in";
    - a CPU, `config` given, its weights larger than the last-level cache and XLA lowering skinny
      multiply-and-sum products to a library kernel: "out_in_reduce";
    - otherwise a CPU with AVX-512: "in_out"; without: "out_in".
    A fixed rule rather than a timing probe, so that one machine always compiles the same program for a
    model and a seeded run repeats its tokens exactly."""
    devices = list(devices)
    if not devices or not all(d.platform == "cpu" for d in devices):
        return "out_in"
    if config is not None and weight_bytes(config) > _last_level_cache_bytes() and _cpu_reduce_is_library_kernel():
        return "out_in_reduce"
    return "in_out" if _cpu_has_avx512() else "out_in"


def _check_orientation(orientation: str) -> None:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"weight orientation {orientation!r}; expected one of {ORIENTATIONS}")


def _in_format(entries: dict[str, Any], orientation: str, flip: Any) -> dict[str, Any]:
    """One layer's "out_in" entries in `orientation`: every `name_t` renamed to `name` + its suffix, and
    for "in_out" replaced by flip(value) (the transpose)."""
    suffix = _SUFFIX[orientation]
    tf = flip if orientation == "in_out" else (lambda v: v)
    return {(k[:-2] + suffix if k.endswith("_t") else k): (tf(v) if k.endswith("_t") else v) for k, v in entries.items()}


def _has_weight(lp: Params, name: str) -> bool:
    return any(f"{name}{suffix}" in lp for suffix in _SUFFIX.values())


def _reduce_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N, in] times w [out, in] as an element-wise product summed over `in` -> [N, out] (float32
    products and sums; see "out_in_reduce" in the module docstring)."""
    f32 = jnp.float32
    return jnp.sum(w[None, :, :].astype(f32) * x[:, None, :].astype(f32), axis=-1)


def is_decode_layout(layer_params: Params) -> bool:
    """Whether one layer's subtree is in this module's layout (the Flax one has `attn` / `mlp`)."""
    return "attn" not in layer_params


def _layer_from_flax(c: ModelConfig, lp: Params, fuse: bool, orientation: str) -> Params:
    """One layer's Flax subtree (no leading layer axis) -> this layout."""
    E, H, D = c.hidden_size, c.num_attention_heads, c.head_dim
    a, m = lp["attn"], lp["mlp"]
    out = {"input_norm": lp["input_norm"]["scale"], "post_attention_norm": lp["post_attention_norm"]["scale"]}
    if c.qk_norm:
        out["q_norm"], out["k_norm"] = a["q_norm"]["scale"], a["k_norm"]["scale"]
    qt, kt, vt = (a[f"{n}_kernel"].reshape(E, -1).T for n in "qkv")
    if fuse:
        out["qkv_t"] = jnp.concatenate([qt, kt, vt], axis=0)
        if c.qkv_bias:
            out["qkv_bias"] = jnp.concatenate([a[f"{n}_bias"].reshape(-1) for n in "qkv"])
        out["gate_up_t"] = jnp.concatenate([m["gate_kernel"].T, m["up_kernel"].T], axis=0)
        if c.mlp_bias:
            out["gate_up_bias"] = jnp.concatenate([m["gate_bias"], m["up_bias"]])
    else:
        out["q_t"], out["k_t"], out["v_t"] = qt, kt, vt
        if c.qkv_bias:
            for n in "qkv":
                out[f"{n}_bias"] = a[f"{n}_bias"].reshape(-1)
        out["gate_t"], out["up_t"] = m["gate_kernel"].T, m["up_kernel"].T
        if c.mlp_bias:
            out["gate_bias"], out["up_bias"] = m["gate_bias"], m["up_bias"]
    out["o_t"] = a["o_kernel"].reshape(H * D, E).T
    if c.o_bias:
        out["o_bias"] = a["o_bias"]
    out["down_t"] = m["down_kernel"].T
    if c.mlp_bias:
        out["down_bias"] = m["down_bias"]
    return _in_format(out, orientation, lambda w: w.T)


def from_stacked(config: ModelConfig, params: Params, *, fuse: bool, orientation: str = "out_in") -> Params:
    """Stacked Flax params (`decoder.init_params` / `load_pretrained`) -> this layout (see module doc).

    fuse: concatenate q/k/v and gate/up (use it when the mesh's tensor axis is 1: fusing head-sharded
    weights would mix shards). orientation: "out_in" or "in_out" (`default_orientation`). Jit it with
    `logical_axes` as output shardings.
    """
    _check_orientation(orientation)
    out = dict(unstack_layers(params))
    out["layers"] = tuple(_layer_from_flax(config, lp, fuse, orientation) for lp in out["layers"])
    if orientation == "in_out" and config.tie_word_embeddings:
        out["lm_head_w"] = params["embed"].T
    if orientation == "out_in_reduce" and not config.tie_word_embeddings:
        out["lm_head_r"] = out.pop("lm_head").T
    return out


def logical_axes(config: ModelConfig, *, fuse: bool, orientation: str = "out_in") -> Params:
    """PartitionSpecs of logical axis names for `from_stacked`'s output: the top-level entries as in
    `decoder.param_logical_axes`; fused weights keep their output axis unsharded."""
    _check_orientation(orientation)
    c = config
    one: dict[str, P] = {"input_norm": P("norm"), "post_attention_norm": P("norm")}
    if c.qk_norm:
        one["q_norm"] = one["k_norm"] = P("head_dim")
    if fuse:
        one["qkv_t"], one["gate_up_t"] = P(None, "embed"), P(None, "embed")
        if c.qkv_bias:
            one["qkv_bias"] = P(None)
        if c.mlp_bias:
            one["gate_up_bias"] = P(None)
    else:
        one.update(q_t=P("q_heads", "embed"), k_t=P("kv_heads", "embed"), v_t=P("kv_heads", "embed"),
                   gate_t=P("mlp", "embed"), up_t=P("mlp", "embed"))
        if c.qkv_bias:
            one.update(q_bias=P("q_heads"), k_bias=P("kv_heads"), v_bias=P("kv_heads"))
        if c.mlp_bias:
            one.update(gate_bias=P("mlp"), up_bias=P("mlp"))
    one["o_t"], one["down_t"] = P("embed", "q_heads"), P("embed", "mlp")
    if c.o_bias:
        one["o_bias"] = P("embed")
    if c.mlp_bias:
        one["down_bias"] = P("embed")
    one = _in_format(one, orientation, lambda spec: P(*reversed(tuple(spec))))
    out = {k: v for k, v in param_logical_axes(c).items() if k != "layers"}
    out["layers"] = tuple(dict(one) for _ in range(c.num_hidden_layers))
    if orientation == "in_out" and c.tie_word_embeddings:
        out["lm_head_w"] = P("embed", "vocab")
    if orientation == "out_in_reduce" and not c.tie_word_embeddings:
        out["lm_head_r"] = P(*reversed(tuple(out.pop("lm_head"))))
    return out


def _out_in_product(x: jax.Array, w: jax.Array, reduce: bool, out_dtype: Any) -> jax.Array:
    """x [N, in] times w [out, in] -> [N, out]: `_reduce_product` when `reduce` and N <= REDUCE_MAX_ROWS,
    else a dot_general contracting w's last axis."""
    if reduce and x.shape[0] <= REDUCE_MAX_ROWS:
        return _reduce_product(x, w).astype(out_dtype)
    return jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def _dense(x: jax.Array, lp: Params, name: str) -> jax.Array:
    """x [N, in] times weight `name` (`name_w` [in, out]; `name_t` [out, in] contracted on its last
    axis; `name_r` [out, in], see "out_in_reduce") -> [N, out], plus `name_bias` when present."""
    if f"{name}_w" in lp:
        y = jnp.matmul(x, lp[f"{name}_w"].astype(x.dtype))
    else:
        reduce = f"{name}_r" in lp
        y = _out_in_product(x, lp[f"{name}_r" if reduce else f"{name}_t"], reduce, x.dtype)
    bias = lp.get(f"{name}_bias")
    return y if bias is None else y + bias.astype(x.dtype)


def is_reduce_format(params: Params) -> bool:
    """Whether per-layer params are in the "out_in_reduce" format (every layer has an o projection)."""
    return "o_r" in params["layers"][0]


def lm_logits(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """Final-norm hidden [..., E] -> float32 logits [..., V] for params in this layout: "in_out" with a
    tied head multiplies by `lm_head_w` [E, V]; "out_in_reduce" by `lm_head_r` or the tied embedding
    ([V, E]) as in `_dense`; "out_in" with `decoder.Decoder.logits`."""
    cdt = jnp.dtype(config.compute_dtype)
    h = hidden.astype(cdt)
    if "lm_head_w" in params:
        return jnp.matmul(h, params["lm_head_w"].astype(cdt), preferred_element_type=jnp.float32)
    if "lm_head_r" in params or (config.tie_word_embeddings and is_reduce_format(params)):
        w = params["lm_head_r"] if "lm_head_r" in params else params["embed"]
        lead = h.shape[:-1]
        rows = h.reshape(-1, h.shape[-1])
        return _out_in_product(rows, w, True, jnp.float32).reshape(*lead, w.shape[0])
    return flax_lm_logits(config, params, hidden)


def layer(config: ModelConfig, lp: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array,
          k_cache: Any, v_cache: Any, index: jax.Array, prefix: Any = None) -> tuple[jax.Array, Any, Any]:
    """One pre-norm block in this layout: x [B, T, E] -> (x [B, T, E], k_cache, v_cache).

    Same arguments and numbers as `decoder.DecoderLayer` with one layer's cache (k [B, K, D, S],
    v [B, K, S, D]) or none; prefix: this layer's shared prefix (`decoder.attend`) or None.
    """
    c = config
    B, T, E = x.shape
    H, K, D, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size

    h = rms_norm(x, lp["input_norm"], c.rms_norm_eps).reshape(B * T, E)
    if _has_weight(lp, "qkv"):
        q, k, v = jnp.split(_dense(h, lp, "qkv"), [H * D, (H + K) * D], axis=1)
    else:
        q, k, v = (_dense(h, lp, n) for n in "qkv")
    q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, K, D), v.reshape(B, T, K, D)
    if c.qk_norm:
        q = rms_norm(q, lp["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], c.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out, k_cache, v_cache = attend(q, k, v, allowed, k_cache, v_cache, None, index, prefix)
    x = x + _dense(out.reshape(B * T, H * D), lp, "o").reshape(B, T, E)

    h = rms_norm(x, lp["post_attention_norm"], c.rms_norm_eps).reshape(B * T, E)
    if _has_weight(lp, "gate_up"):
        gate, up = jnp.split(_dense(h, lp, "gate_up"), [F], axis=1)
    else:
        gate, up = _dense(h, lp, "gate"), _dense(h, lp, "up")
    act = nn.with_logical_constraint((jax.nn.silu(gate) * up).reshape(B, T, F),
                                     ("activation_batch", "activation_length", "activation_mlp"))
    x = x + _dense(act.reshape(B * T, F), lp, "down").reshape(B, T, E)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, k_cache, v_cache
