"""Pure-functional BERT encoder (the transformer of BERT-family sentence-transformers models).

The model is `(config, params)`: `params` is a plain pytree of arrays and `apply` a pure function, so it
jits, shards and vmaps like any JAX function. Layer parameters are stacked on a leading `layers` axis.
Every leaf has logical axis names (`param_logical_axes`) that `rwml_jax.sharding` maps onto a mesh.

Shapes: B batch, S tokens, E hidden, N heads, D head_dim (E = N * D), F intermediate, V vocabulary,
P max positions, L layers.

Parameter layout (HF name -> ours):
    embeddings.word_embeddings.weight [V, E]        -> embed/word            [V, E]
    embeddings.position_embeddings.weight [P, E]    -> embed/position        [P, E]
    embeddings.token_type_embeddings.weight [T, E]  -> embed/token_type      [T, E]
    embeddings.LayerNorm.{weight,bias}              -> embed/norm/{scale,bias} [E]
    attention.self.{query,key,value}.{weight,bias}  -> layers/qkv_kernel [L, E, 3, N, D] (fused),
                                                       layers/qkv_bias   [L, 3, N, D]
    attention.output.dense                          -> layers/out_kernel [L, N, D, E], out_bias [L, E]
    attention.output.LayerNorm                      -> layers/attn_norm/{scale,bias} [L, E]
    intermediate.dense                              -> layers/mlp_in_kernel [L, E, F], mlp_in_bias [L, F]
    output.dense                                    -> layers/mlp_out_kernel [L, F, E], mlp_out_bias [L, E]
    output.LayerNorm                                -> layers/mlp_norm/{scale,bias} [L, E]
The fused QKV kernel turns three [B*S, E] x [E, E] matmuls into one [B*S, E] x [E, 3E] matmul.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from rwml_jax.models.config import read_config_json
from rwml_jax.models.safetensors_io import SafetensorsFile

Params = dict[str, Any]

SUPPORTED_BERT_TYPES = ("bert",)
_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
_NEG_INF = -1e30


class BertCheckpointError(ValueError):
    """A BERT checkpoint is missing a tensor, has a wrongly shaped one, or an unsupported option."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shapes and options of a BERT encoder (hashable: usable as a static jit argument)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise BertCheckpointError(f"hidden_act={self.hidden_act!r} is not supported; supported: {_ACTIVATIONS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_params(self) -> int:
        e, f, l = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        emb = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * e + 2 * e
        layer = 4 * e * e + 4 * e + 2 * e * f + f + e + 4 * e
        return emb + l * layer

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (excludes embedding tables, norms, biases)."""
        e, f = self.hidden_size, self.intermediate_size
        return self.num_hidden_layers * (4 * e * e + 2 * e * f)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> "BertConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_BERT_TYPES:
            raise BertCheckpointError(
                f"model_type {model_type!r} is not a supported encoder; supported: {SUPPORTED_BERT_TYPES}"
            )
        pos_type = d.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise BertCheckpointError(f"position_embedding_type={pos_type!r}; only 'absolute' is supported")
        kw: dict[str, Any] = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 512),
            type_vocab_size=d.get("type_vocab_size", 2),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            hidden_act=d.get("hidden_act", "gelu"),
            pad_token_id=d.get("pad_token_id") or 0,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "BertConfig":
        return cls.from_hf_dict(read_config_json(path), **overrides)


# ---------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------

def param_logical_axes(config: BertConfig) -> Params:
    """Pytree matching `params` whose leaves are PartitionSpecs of logical axis names."""
    del config
    norm = {"scale": P("norm"), "bias": P("norm")}
    lnorm = {"scale": P("layers", "norm"), "bias": P("layers", "norm")}
    return {
        "embed": {
            "word": P("vocab", "embed"),
            "position": P(None, "embed"),
            "token_type": P(None, "embed"),
            "norm": norm,
        },
        "layers": {
            "qkv_kernel": P("layers", "embed", None, "q_heads", "head_dim"),
            "qkv_bias": P("layers", None, "q_heads", "head_dim"),
            "out_kernel": P("layers", "q_heads", "head_dim", "embed"),
            "out_bias": P("layers", "norm"),
            "attn_norm": lnorm,
            "mlp_in_kernel": P("layers", "embed", "mlp"),
            "mlp_in_bias": P("layers", "mlp"),
            "mlp_out_kernel": P("layers", "mlp", "embed"),
            "mlp_out_bias": P("layers", "norm"),
            "mlp_norm": lnorm,
        },
    }


def param_shapes(config: BertConfig) -> Params:
    """Pytree of `jax.ShapeDtypeStruct` for the parameters."""
    c = config
    E, N, D, F, L = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size, c.num_hidden_layers
    dt = jnp.dtype(c.param_dtype)

    def s(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dt)

    return {
        "embed": {
            "word": s(c.vocab_size, E),
            "position": s(c.max_position_embeddings, E),
            "token_type": s(c.type_vocab_size, E),
            "norm": {"scale": s(E), "bias": s(E)},
        },
        "layers": {
            "qkv_kernel": s(L, E, 3, N, D),
            "qkv_bias": s(L, 3, N, D),
            "out_kernel": s(L, N, D, E),
            "out_bias": s(L, E),
            "attn_norm": {"scale": s(L, E), "bias": s(L, E)},
            "mlp_in_kernel": s(L, E, F),
            "mlp_in_bias": s(L, F),
            "mlp_out_kernel": s(L, F, E),
            "mlp_out_bias": s(L, E),
            "mlp_norm": {"scale": s(L, E), "bias": s(L, E)},
        },
    }


def init_params(config: BertConfig, rng: jax.Array) -> Params:
    """Random parameters: normal(0.02) matrices, unit norm scales, zero biases."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(rng, len(leaves))
    out = []
    for (path, s), k in zip(leaves, keys):
        name = str(path[-1].key)
        if name == "scale":
            out.append(jnp.ones(s.shape, s.dtype))
        elif name.endswith("bias"):
            out.append(jnp.zeros(s.shape, s.dtype))
        else:
            out.append((0.02 * jax.random.normal(k, s.shape)).astype(s.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _hf_prefix(names: set[str]) -> str:
    for prefix in ("", "bert.", "model.", "0.auto_model."):
        if prefix + "embeddings.word_embeddings.weight" in names:
            return prefix
    raise BertCheckpointError(
        "no 'embeddings.word_embeddings.weight' tensor (with or without a 'bert.' prefix): not a BERT checkpoint"
    )


def params_from_hf(tensors: Any, config: BertConfig) -> dict[str, Any]:
    """Map HF BERT tensors (a name -> numpy array mapping) to our host (numpy) parameter pytree."""
    c = config
    E, N, D, F = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size
    names = set(tensors.keys())
    pre = _hf_prefix(names)

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = pre + name
        if full not in names:
            raise BertCheckpointError(f"checkpoint is missing tensor {full!r}")
        x = np.asarray(tensors[full], dtype=np.float32)
        if x.shape != shape:
            raise BertCheckpointError(f"tensor {full!r} has shape {x.shape}, but config.json implies {shape}")
        return x

    def layer(i: int) -> dict[str, Any]:
        p = f"encoder.layer.{i}."
        q, k, v = (get(p + f"attention.self.{n}.weight", (E, E)) for n in ("query", "key", "value"))
        qb, kb, vb = (get(p + f"attention.self.{n}.bias", (E,)) for n in ("query", "key", "value"))
        return {
            # torch Linear weight is [out, in]: ours is [in, 3, N, D].
            "qkv_kernel": np.stack([w.T.reshape(E, N, D) for w in (q, k, v)], axis=1),
            "qkv_bias": np.stack([b.reshape(N, D) for b in (qb, kb, vb)]),
            "out_kernel": get(p + "attention.output.dense.weight", (E, E)).T.reshape(N, D, E),
            "out_bias": get(p + "attention.output.dense.bias", (E,)),
            "attn_norm": {
                "scale": get(p + "attention.output.LayerNorm.weight", (E,)),
                "bias": get(p + "attention.output.LayerNorm.bias", (E,)),
            },
            "mlp_in_kernel": get(p + "intermediate.dense.weight", (F, E)).T,
            "mlp_in_bias": get(p + "intermediate.dense.bias", (F,)),
            "mlp_out_kernel": get(p + "output.dense.weight", (E, F)).T,
            "mlp_out_bias": get(p + "output.dense.bias", (E,)),
            "mlp_norm": {
                "scale": get(p + "output.LayerNorm.weight", (E,)),
                "bias": get(p + "output.LayerNorm.bias", (E,)),
            },
        }

    layers = [layer(i) for i in range(c.num_hidden_layers)]
    params = {
        "embed": {
            "word": get("embeddings.word_embeddings.weight", (c.vocab_size, E)),
            "position": get("embeddings.position_embeddings.weight", (c.max_position_embeddings, E)),
            "token_type": get("embeddings.token_type_embeddings.weight", (c.type_vocab_size, E)),
            "norm": {
                "scale": get("embeddings.LayerNorm.weight", (E,)),
                "bias": get("embeddings.LayerNorm.bias", (E,)),
            },
        },
        "layers": jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers),
    }
    dt = np.dtype(jnp.dtype(c.param_dtype))
    params = jax.tree_util.tree_map(lambda x: x.astype(dt, copy=False), params)
    return params


def load_bert(
    path: str | os.PathLike,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    shardings: Any = None,
) -> tuple[BertConfig, Params]:
    """Read `config.json` + `model.safetensors` of an HF BERT folder (no torch) -> (config, params).

    shardings: optional pytree of `jax.sharding.Sharding` matching the params (e.g. from
    `rwml_jax.sharding.logical_to_sharding(param_logical_axes(config), mesh)`); every device then
    receives only its slice. Without it, parameters go to the default device.
    """
    path = os.fspath(path)
    config = BertConfig.from_pretrained(path, param_dtype=dtype, compute_dtype=compute_dtype or dtype)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        found = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"no model.safetensors in {path!r} (found: {', '.join(found) or 'nothing'}); PyTorch .bin weights "
            "are not read: convert them with transformers' save_pretrained(safe_serialization=True)"
        )
    host = params_from_hf(SafetensorsFile(weights), config)
    if shardings is None:
        return config, jax.tree_util.tree_map(jnp.asarray, host)
    params = jax.tree_util.tree_map(
        lambda h, s: jax.make_array_from_callback(h.shape, s, lambda idx, h=h: h[idx]), host, shardings
    )
    return config, params


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------

def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32, returned in `x.dtype`."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "gelu":  # HF "gelu" is the exact erf form
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.relu(x)


def _attention(config: BertConfig, x: jax.Array, bias: jax.Array, p: Params) -> jax.Array:
    """Self-attention output before the residual: x [B, S, E] -> [B, S, E].

    Q, K and V come out of one fused matmul in [3, B, N, S, D] layout (batch and heads leading, so the
    score and mixing matmuls are plain batched GEMMs). The softmax normalisation is applied to the
    [B, N, S, D] context instead of the [B, N, S, S] probabilities (D < S saves a pass).
    """
    c = config
    cdt = jnp.dtype(c.compute_dtype)
    qkv = jnp.einsum("bse,etnd->tbnsd", x, p["qkv_kernel"].astype(cdt))
    qkv = qkv + p["qkv_bias"].astype(cdt)[:, None, :, None, :]
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = jnp.einsum("bnqd,bnkd->bnqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (c.head_dim**-0.5) + bias
    scores = scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    ctx = jnp.einsum("bnqk,bnkd->bnqd", weights.astype(cdt), v, preferred_element_type=jnp.float32)
    ctx = (ctx / denom).astype(cdt)
    return jnp.einsum("bnqd,nde->bqe", ctx, p["out_kernel"].astype(cdt)) + p["out_bias"].astype(cdt)


def _layer(config: BertConfig, x: jax.Array, bias: jax.Array, p: Params) -> jax.Array:
    """One post-norm BERT block. x [B, S, E]; bias [B, 1, 1, S] additive attention mask (0 or -inf)."""
    c = config
    cdt = jnp.dtype(c.compute_dtype)
    x = layer_norm(x + _attention(c, x, bias, p), p["attn_norm"]["scale"], p["attn_norm"]["bias"], c.layer_norm_eps)
    h = x @ p["mlp_in_kernel"].astype(cdt) + p["mlp_in_bias"].astype(cdt)
    h = _activation(c.hidden_act, h)
    h = h @ p["mlp_out_kernel"].astype(cdt) + p["mlp_out_bias"].astype(cdt)
    return layer_norm(x + h, p["mlp_norm"]["scale"], p["mlp_norm"]["bias"], c.layer_norm_eps)


def apply(
    config: BertConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    unroll: bool = False,
) -> jax.Array:
    """Token ids [B, S] (right-padded) -> last hidden state [B, S, E] (HF `last_hidden_state`).

    attention_mask: [B, S], 1 for real tokens and 0 for padding (default all ones). token_type_ids:
    [B, S] segment ids (default zeros). unroll: unroll the layer loop instead of a `lax.scan` over
    the stacked layers (the default: compiles one layer body, ~40% faster to compile, same speed).
    """
    c = config
    cdt = jnp.dtype(c.compute_dtype)
    B, S = input_ids.shape
    if S > c.max_position_embeddings:
        raise ValueError(f"sequence length {S} exceeds max_position_embeddings={c.max_position_embeddings}")
    if attention_mask is None:
        attention_mask = jnp.ones((B, S), jnp.int32)
    emb = params["embed"]
    x = jnp.take(emb["word"], input_ids, axis=0)
    x = x + emb["position"][None, :S]
    if token_type_ids is None:
        x = x + emb["token_type"][0]
    else:
        x = x + jnp.take(emb["token_type"], token_type_ids, axis=0)
    x = layer_norm(x.astype(cdt), emb["norm"]["scale"], emb["norm"]["bias"], c.layer_norm_eps)
    bias = jnp.where(attention_mask.astype(bool), 0.0, _NEG_INF).astype(jnp.float32)[:, None, None, :]

    def body(h: jax.Array, layer_params: Params) -> tuple[jax.Array, None]:
        return _layer(c, h, bias, layer_params), None

    if unroll:
        for i in range(c.num_hidden_layers):
            x, _ = body(x, jax.tree_util.tree_map(lambda a, i=i: a[i], params["layers"]))
    else:
        x, _ = jax.lax.scan(body, x, params["layers"])
    return x
