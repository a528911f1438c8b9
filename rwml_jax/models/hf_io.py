"""Hugging Face checkpoint folders <-> decoder parameter pytrees, without torch.

`load_pretrained` reads `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`) through memory maps and places each parameter directly into its
sharding: with a mesh, every device receives only its own slice, so a checkpoint is never fully
materialised on one device. `save_pretrained` writes a folder `transformers.AutoModelForCausalLM`
loads back. Mixture-of-experts checkpoints (Qwen3-MoE) keep one tensor per expert
(`model.layers.{i}.mlp.experts.{j}.gate_proj.weight`, as on the hub and as transformers 5 saves them);
here they are stacked into [layers, experts, ...] arrays, each device reading only the layers and
experts of its own shard.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwml_jax import sharding as sh
from rwml_jax import storage
from rwml_jax.models import decoder
from rwml_jax.models.config import ModelConfig
from rwml_jax.models.safetensors_io import SafetensorsFile, save_file

# One entry per parameter leaf: (path in the params pytree, HF name template ({i} = layer), to_ours,
# to_hf). to_ours maps the HF tensor of one layer to our layout; to_hf is its inverse.
Converter = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _t(x: np.ndarray, c: ModelConfig) -> np.ndarray:
    return x.T


def _heads(n_attr: str) -> tuple[Converter, Converter]:
    """[n*D, E] (torch Linear) <-> [E, n, D]."""

    def to_ours(x, c):
        return x.T.reshape(c.hidden_size, getattr(c, n_attr), c.head_dim)

    def to_hf(x, c):
        return x.reshape(c.hidden_size, -1).T

    return to_ours, to_hf


def _head_bias(n_attr: str) -> tuple[Converter, Converter]:
    return (lambda x, c: x.reshape(getattr(c, n_attr), c.head_dim)), (lambda x, c: x.reshape(-1))


def _o_proj() -> tuple[Converter, Converter]:
    """[E, H*D] <-> [H, D, E]."""
    return (
        lambda x, c: x.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size),
        lambda x, c: x.reshape(-1, c.hidden_size).T,
    )


_ID: tuple[Converter, Converter] = (lambda x, c: x, lambda x, c: x)
_T: tuple[Converter, Converter] = (_t, _t)

_LAYER = "model.layers.{i}."
_TABLE: list[tuple[tuple[str, ...], str, tuple[Converter, Converter]]] = [
    (("embed",), "model.embed_tokens.weight", _ID),
    (("final_norm", "scale"), "model.norm.weight", _ID),
    (("lm_head",), "lm_head.weight", _T),
    (("layers", "input_norm", "scale"), _LAYER + "input_layernorm.weight", _ID),
    (("layers", "post_attention_norm", "scale"), _LAYER + "post_attention_layernorm.weight", _ID),
    (("layers", "attn", "q_kernel"), _LAYER + "self_attn.q_proj.weight", _heads("num_attention_heads")),
    (("layers", "attn", "k_kernel"), _LAYER + "self_attn.k_proj.weight", _heads("num_key_value_heads")),
    (("layers", "attn", "v_kernel"), _LAYER + "self_attn.v_proj.weight", _heads("num_key_value_heads")),
    (("layers", "attn", "o_kernel"), _LAYER + "self_attn.o_proj.weight", _o_proj()),
    (("layers", "attn", "q_bias"), _LAYER + "self_attn.q_proj.bias", _head_bias("num_attention_heads")),
    (("layers", "attn", "k_bias"), _LAYER + "self_attn.k_proj.bias", _head_bias("num_key_value_heads")),
    (("layers", "attn", "v_bias"), _LAYER + "self_attn.v_proj.bias", _head_bias("num_key_value_heads")),
    (("layers", "attn", "o_bias"), _LAYER + "self_attn.o_proj.bias", _ID),
    (("layers", "attn", "q_norm", "scale"), _LAYER + "self_attn.q_norm.weight", _ID),
    (("layers", "attn", "k_norm", "scale"), _LAYER + "self_attn.k_norm.weight", _ID),
    (("layers", "mlp", "gate_kernel"), _LAYER + "mlp.gate_proj.weight", _T),
    (("layers", "mlp", "up_kernel"), _LAYER + "mlp.up_proj.weight", _T),
    (("layers", "mlp", "down_kernel"), _LAYER + "mlp.down_proj.weight", _T),
    (("layers", "mlp", "gate_bias"), _LAYER + "mlp.gate_proj.bias", _ID),
    (("layers", "mlp", "up_bias"), _LAYER + "mlp.up_proj.bias", _ID),
    (("layers", "mlp", "down_bias"), _LAYER + "mlp.down_proj.bias", _ID),
    # sparse layers of a mixture-of-experts model ({j} = expert)
    (("layers", "moe", "router"), _LAYER + "mlp.gate.weight", _T),
    (("layers", "moe", "gate_kernel"), _LAYER + "mlp.experts.{j}.gate_proj.weight", _T),
    (("layers", "moe", "up_kernel"), _LAYER + "mlp.experts.{j}.up_proj.weight", _T),
    (("layers", "moe", "down_kernel"), _LAYER + "mlp.experts.{j}.down_proj.weight", _T),
]


class CheckpointError(ValueError):
    """A checkpoint folder is missing a tensor, or a tensor has the wrong shape."""


def _leaf_paths(tree: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield tuple(k.key for k in path), leaf


def _layer_indices(config: ModelConfig, path: tuple[str, ...]) -> list[int]:
    """The HF layer numbers along the stacked axis of the `layers` leaf at `path` (dense MLPs are stacked
    over the dense layers, experts over the sparse ones, everything else over all layers)."""
    kinds = config.sparse_layers
    if path[1] in ("mlp", "moe"):
        return [i for i, sparse in enumerate(kinds) if sparse == (path[1] == "moe")]
    return list(range(config.num_hidden_layers))


def _reader(tensors: _TensorIndex, path: tuple[str, ...], name: str, conv: tuple[Converter, Converter],
            config: ModelConfig, shape: tuple[int, ...]) -> tuple[int, Callable[..., np.ndarray]]:
    """(the number of stacked leading axes of the leaf, read(*stack indices) -> that slice in our layout):
    0 for top-level leaves, 1 (layer) for layer leaves, 2 (layer, expert) for expert weights."""
    if path[0] != "layers":
        return 0, lambda: _convert(tensors, name, conv, config, shape)
    layers = _layer_indices(config, path)
    if "{j}" in name:
        return 2, lambda a, b: _convert(tensors, name.format(i=layers[a], j=b), conv, config, shape[2:])
    return 1, lambda a: _convert(tensors, name.format(i=layers[a]), conv, config, shape[1:])


def _read_block(n_lead: int, read: Callable[..., np.ndarray], shape: tuple[int, ...], idx: tuple[slice, ...],
                dtype: np.dtype) -> np.ndarray:
    """The block `idx` of a leaf of `shape`, reading only the stacked (layer, expert) slices it covers."""
    idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
    lead = [range(*s.indices(d)) for s, d in zip(idx[:n_lead], shape[:n_lead])]
    parts = [np.asarray(read(*combo)[idx[n_lead:]], dtype) for combo in itertools.product(*lead)]
    return np.stack(parts).reshape(*(len(r) for r in lead), *parts[0].shape) if n_lead else parts[0]


def _entries(config: ModelConfig) -> list[tuple[tuple[str, ...], str, tuple[Converter, Converter], Any]]:
    """The table rows that exist for this config, with the expected ShapeDtypeStruct of each leaf."""
    shapes = dict(_leaf_paths(decoder.param_shapes(config)))
    rows = [(p, n, conv, shapes[p]) for p, n, conv in _TABLE if p in shapes]
    missing = set(shapes) - {r[0] for r in rows}
    assert not missing, f"no HF name for parameters {missing}"
    return rows


class _TensorIndex:
    """Name -> array lookup across the single file or all shards of a checkpoint folder."""

    def __init__(self, path: str):
        index_path = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = {fn: SafetensorsFile(os.path.join(path, fn)) for fn in sorted(set(weight_map.values()))}
            self._where = {name: files[fn] for name, fn in weight_map.items()}
        elif os.path.isfile(single):
            f = SafetensorsFile(single)
            self._where = {name: f for name in f}
        else:
            found = sorted(os.listdir(path))
            raise FileNotFoundError(
                f"no weights in {path!r}: expected model.safetensors or model.safetensors.index.json "
                f"(found: {', '.join(found) or 'nothing'}); PyTorch .bin checkpoints are not read, convert "
                "them with transformers' save_pretrained(safe_serialization=True)"
            )

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        return self._where[name][name]

    def __contains__(self, name: str) -> bool:
        return name in self._where


def load_pretrained(
    path: str | os.PathLike,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    **config_overrides: Any,
) -> tuple[ModelConfig, Any]:
    """Load an HF decoder folder -> (config, params).

    dtype: the parameter dtype ("float32", "bfloat16", "float16"). compute_dtype: matmul dtype
    (defaults to `dtype`). mesh / rules: place every parameter directly into its sharding on `mesh`
    (rules default to `rwml_jax.sharding.DEFAULT_RULES`); without a mesh, parameters go to the default
    device. Extra keyword arguments override config fields (e.g. compute_dtype="bfloat16").
    """
    path = storage.local_copy(path)  # a bucket folder: downloaded once into this host's cache
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model path {path!r} is not a folder; expected a Hugging Face model folder with config.json and "
            "*.safetensors (on a machine with internet: `huggingface-cli download Qwen/Qwen3-0.6B --local-dir DIR`)"
        )
    config = ModelConfig.from_pretrained(
        path, param_dtype=dtype, compute_dtype=compute_dtype or dtype, **config_overrides
    )
    tensors = _TensorIndex(path)
    shardings = None
    if mesh is not None:

        shardings = dict(_leaf_paths(decoder.param_shardings(config, mesh, rules or sh.DEFAULT_RULES)))
    target = np.dtype(jnp.dtype(dtype))

    leaves: dict[tuple[str, ...], jax.Array] = {}
    for p, name, conv, spec in _entries(config):
        n_lead, read = _reader(tensors, p, name, conv, config, spec.shape)
        if shardings is not None:
            leaves[p] = jax.make_array_from_callback(
                spec.shape, shardings[p], lambda idx, n=n_lead, r=read, s=spec.shape: _read_block(n, r, s, idx, target))
        else:
            leaves[p] = jnp.asarray(_read_block(n_lead, read, spec.shape, (), target))
    return config, _unflatten(leaves)


def _convert(tensors: _TensorIndex, name: str, conv: tuple[Converter, Converter], config: ModelConfig,
             shape: tuple[int, ...]) -> np.ndarray:
    """Read HF tensor `name` and map it to our layout, checking it against the expected `shape`."""
    to_ours, to_hf = conv
    raw = np.asarray(tensors.get(name))
    try:
        x = to_ours(raw, config)
    except ValueError:
        x = None
    if x is None or x.shape != tuple(shape):
        expected = tuple(to_hf(np.zeros(shape, np.float32), config).shape)
        raise CheckpointError(f"tensor {name!r} has shape {tuple(raw.shape)}, but config.json implies {expected}")
    return x


def _unflatten(leaves: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in leaves.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def save_pretrained(
    config: ModelConfig,
    params: Any,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 4 << 30,
    tokenizer: Any = None,
    dtype: str | None = None,
) -> None:
    """Write `params` as an HF folder (config.json + safetensors, sharded above `max_shard_bytes`).

    Every process calls it. Parameters are gathered to the host one at a time (`sharding.to_host`: a
    multi-host sharded array is all-gathered, so only one parameter is ever whole in host memory at
    once) and cast to `dtype` ("bfloat16" halves an export; default: as stored, `config.param_dtype` in
    config.json follows it); only the writer process (`storage.is_writer`) writes. `path` may be a bucket
    URL: the folder is written locally, then uploaded. The files are written under temporary names and
    renamed into place, so a crash never leaves a half-written checkpoint that looks complete.
    """
    if dtype is not None:
        config = config.replace(param_dtype=dtype)
    if storage.is_remote(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="rwml-export-") as tmp:
            save_pretrained(config, params, tmp, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer, dtype=dtype)
            if storage.is_writer():
                storage.upload_dir(tmp, path)
        storage.sync("save_pretrained-upload")
        return
    path = os.fspath(path)
    writer = storage.is_writer()
    if writer:
        os.makedirs(path, exist_ok=True)
    flat = dict(_leaf_paths(params))
    out: dict[str, np.ndarray] = {}
    for p, name, (_, to_hf), _spec in _entries(config):
        host = sh.to_host(flat[p])
        if dtype is not None:
            host = host.astype(jnp.dtype(dtype))
        if not writer:
            continue
        if p[0] == "layers":
            for a, i in enumerate(_layer_indices(config, p)):
                if "{j}" in name:
                    for j in range(host.shape[1]):
                        out[name.format(i=i, j=j)] = np.ascontiguousarray(to_hf(host[a, j], config))
                else:
                    out[name.format(i=i)] = np.ascontiguousarray(to_hf(host[a], config))
        else:
            out[name] = np.ascontiguousarray(to_hf(host, config))
    if not writer:
        storage.sync("save_pretrained")
        return

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in out.items():
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fn))
            weight_map.update({name: fn for name in shard})
        total = sum(a.nbytes for a in out.values())
        _write_json(os.path.join(path, "model.safetensors.index.json"), {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(path, "config.json"), config.to_hf_dict())
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    storage.sync("save_pretrained")


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
