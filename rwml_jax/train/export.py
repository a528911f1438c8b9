"""Export a run's model (a finished stage, or one checkpoint step) as a standard Hugging Face folder.

    export_model(work_dir, "rwml", out, dtype="bfloat16")      # <work_dir>/rwml/model
    export_model(work_dir, "rwml@40", out)                    # step 40 of <work_dir>/rwml/checkpoints

The folder holds ``model.safetensors`` (or shards + ``model.safetensors.index.json`` above `max_shard_bytes`),
``config.json`` (``torch_dtype`` = the export dtype), ``generation_config.json``, the tokenizer files with
its chat template, and a short ``README.md`` model card (run, stage, step, recipe, the stage's DONE.json
summary). It is the layout `transformers.AutoModelForCausalLM` / `AutoTokenizer` and vLLM load, with no
custom code. `push_to_hub` uploads such a folder with ``huggingface_hub``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwml_jax.config.recipes import import_configs_module
from rwml_jax.config.stages import INSTANCED, MODEL_STAGES
from rwml_jax.models import hf_io
from rwml_jax.models.config import ModelConfig
from rwml_jax.train.checkpoint import Checkpointer
from rwml_jax.train.runtime import load_tokenizer, resolve_model_path
from rwml_jax.train.stage_io import atomic_write_json, atomic_write_text, read_json

EXPORT_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# STAGE argument -> (stage folder, model folder inside it)
MODEL_FOLDERS: dict[str, tuple[str, str]] = {
    **{s: (s, "model") for s in MODEL_STAGES}, "filter": ("filter", "filter_model"), "filter_model": ("filter", "filter_model"),
    **{f"{s}@{i}": (f"{s}@{i}", "model") for s, inits in INSTANCED.items() if s in MODEL_STAGES for i in inits},
}


class ExportError(RuntimeError):
    """The stage or step cannot be exported (not there, no config, unknown name), or the upload failed."""


@dataclass(frozen=True)
class ExportSource:
    """What is exported: `stage` of the run in `work_dir`; `step` of its checkpoints, or None = the stage's model."""

    work_dir: Path
    stage: str
    step: int | None

    @property
    def stage_dir(self) -> Path:
        return self.work_dir / MODEL_FOLDERS[self.stage][0]

    @property
    def model_dir(self) -> Path:
        return self.stage_dir / MODEL_FOLDERS[self.stage][1]

    @property
    def label(self) -> str:
        return self.stage if self.step is None else f"{self.stage}@{self.step}"


def parse_stage(work_dir: str | os.PathLike, spec: str) -> ExportSource:
    """`spec`: a model stage ("warmstart", "rwml", "wm_sft", "filter" / "filter_model", "policy_rl" or an
    instance "policy_rl@rwml"), or "<stage>@<step>" ("rwml@40", "policy_rl@rwml@300")."""
    name, _, step = spec.rpartition("@") if spec.rpartition("@")[2].isdigit() else (spec, "", "")
    if name not in MODEL_FOLDERS:
        raise ExportError(f"unknown stage {name!r}: expected one of {', '.join(MODEL_FOLDERS)}, optionally "
                          f"with @STEP (a checkpoint step), e.g. rwml@40")
    return ExportSource(Path(work_dir), name, int(step) if step else None)


def _run_config(src: ExportSource) -> dict[str, Any]:
    """The recipe the stage ran with (from its DONE.json or STARTED.json provenance), or {}."""
    for marker in ("DONE.json", "STARTED.json"):
        p = src.stage_dir / marker
        if p.exists():
            return read_json(p).get("provenance", {}).get("config", {}) or {}
    return {}


def _start_model_dir(src: ExportSource) -> Path | None:
    """The folder the stage started from: the recipe's model.path, else the run's warm-start model."""
    path = _run_config(src).get("model", {}).get("path")
    if path:
        return Path(resolve_model_path(path))
    ws = src.work_dir / "warmstart" / "model"
    return ws if (ws / "config.json").is_file() and src.stage != "warmstart" else None


def _model_config(src: ExportSource, tokenizer: Any) -> ModelConfig:
    """The architecture of a checkpoint: its stage's model folder, the model it started from, or (warm start
    killed before its first model was written) the recipe's preset sized to the stage's tokenizer."""
    for d in (src.model_dir, _start_model_dir(src)):
        if d is not None and (d / "config.json").is_file():
            return ModelConfig.from_pretrained(d)
    cfg = _run_config(src).get("model", {})
    if src.stage == "warmstart" and cfg.get("preset"):
        preset = dict(import_configs_module("models").PRESETS[cfg["preset"]])
        preset.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        return ModelConfig.from_hf_dict(preset)
    raise ExportError(f"no config.json for {src.label}: looked in {src.model_dir} and the model the stage started from")


def _tokenizer_dir(src: ExportSource) -> Path:
    run_tok = _run_config(src).get("model", {}).get("tokenizer")
    cands = [src.model_dir, Path(resolve_model_path(run_tok)) if run_tok else None, _start_model_dir(src)]
    for d in cands:
        if d is not None and ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
            return d
    raise ExportError(f"no tokenizer for {src.label}: looked in {', '.join(str(d) for d in cands if d)}")


def load_source(src: ExportSource) -> tuple[ModelConfig, Any, Any, Path]:
    """(model config, float32 params on the default device, tokenizer, tokenizer folder) of `src`."""
    if src.step is None:
        if not (src.model_dir / "config.json").is_file():
            raise ExportError(f"{src.model_dir} holds no model (no config.json): has stage {src.stage!r} finished? "
                              f"A checkpoint step of it exports with {src.stage}@STEP")
        config, params = hf_io.load_pretrained(src.model_dir, dtype="float32")
        tok_dir = _tokenizer_dir(src)
        return config, params, load_tokenizer(os.fspath(tok_dir)), tok_dir
    ckpt_dir = src.stage_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ExportError(f"stage {src.stage!r} has no checkpoints in {ckpt_dir}")
    tok_dir = _tokenizer_dir(src)
    tokenizer = load_tokenizer(os.fspath(tok_dir))
    config = _model_config(src, tokenizer).replace(param_dtype="float32", compute_dtype="float32")
    with Checkpointer(ckpt_dir, async_save=False) as ck:
        if src.step not in ck.all_steps():
            raise ExportError(f"no checkpoint step {src.step} in {ckpt_dir} (steps: {ck.all_steps()})")
        state, _ = ck.restore(src.step)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), state["train"]["params"])
    return config, params, tokenizer, tok_dir


def _generation_config(config: ModelConfig, tokenizer: Any, tok_dir: Path) -> dict[str, Any]:
    """The source's generation_config.json when it has one (sampling defaults of hub models), else the
    special tokens."""
    src = tok_dir / "generation_config.json"
    gen = json.loads(src.read_text()) if src.is_file() else {}
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    gen.setdefault("eos_token_id", list(eos) if isinstance(eos, tuple) else eos)
    gen.setdefault("pad_token_id", tokenizer.pad_token_id)
    if config.bos_token_id is not None:
        gen.setdefault("bos_token_id", config.bos_token_id)
    return gen


def _model_card(src: ExportSource, dtype: str, config: ModelConfig) -> str:
    done_file = src.stage_dir / "DONE.json"
    done = read_json(done_file) if done_file.exists() else {}
    prov = done.get("provenance") or (read_json(src.stage_dir / "STARTED.json").get("provenance", {})
                                      if (src.stage_dir / "STARTED.json").exists() else {})
    recipe = prov.get("recipe") or "?"
    scalars = {k: v for k, v in done.get("summary", {}).items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- rwml-jax", "---", "",
        f"# {recipe} / {src.label}", "",
        f"Exported by `rwml-jax export` from the run folder `{src.work_dir.name}`: stage `{src.stage}`, "
        + (f"checkpoint step {src.step}." if src.step is not None else "its final model."), "",
        f"- recipe: `{recipe}`", f"- base model: `{prov.get('model') or '?'}`", f"- architecture: {config.model_type}, "
        f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_params:,} parameters",
        f"- weights: {dtype} safetensors", f"- code: rwml-jax git {prov.get('git', {}).get('commit', '?')}", "",
    ]
    if scalars:
        lines += ["## Stage metrics (DONE.json)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars.items()]
    elif not done:
        lines += ["The stage had not finished when this was exported (no DONE.json)."]
    return "\n".join(lines) + "\n"


def export_model(work_dir: str | os.PathLike, stage: str, out: str | os.PathLike, *, dtype: str = "float32",
                 max_shard_bytes: int = 4 << 30) -> Path:
    """Write the Hugging Face folder of `stage` ("rwml", "rwml@40", ...) of the run in `work_dir` to `out`."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    src = parse_stage(work_dir, stage)
    if not src.work_dir.is_dir():
        raise ExportError(f"run folder {src.work_dir} does not exist")
    config, params, tokenizer, tok_dir = load_source(src)
    config = config.replace(param_dtype=dtype, compute_dtype=dtype)
    params = jax.tree.map(lambda a: np.asarray(jax.device_get(a)).astype(jnp.dtype(dtype)), params)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new folder")
    hf_io.save_pretrained(config, params, out, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)
    for extra in ("chat_template.jinja",):  # older transformers keep the template in tokenizer_config.json only
        if (tok_dir / extra).is_file() and not (out / extra).exists():
            shutil.copy(tok_dir / extra, out / extra)
    atomic_write_json(out / "generation_config.json", _generation_config(config, tokenizer, tok_dir))
    atomic_write_text(out / "README.md", _model_card(src, dtype, config))
    return out


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """Upload an exported folder to the Hugging Face hub repo `repo_id` (created when missing); returns its URL.

    Needs the network and a token (``huggingface-cli login`` or HF_TOKEN); raises ExportError otherwise."""
    import huggingface_hub  # only the upload needs it (a transformers dependency)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ExportError(f"--push-to-hub {repo_id!r} is not a hub repo id (expected 'user/name'): {e}") from e
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ExportError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so nothing was uploaded; the folder "
                          f"{folder} is written: upload it later with `huggingface-cli upload {repo_id} {folder}`")
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=os.fspath(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="rwml-jax export")
    except Exception as e:  # network, auth, permissions: one clear message
        raise ExportError(f"--push-to-hub {repo_id} failed ({type(e).__name__}: {e}); the folder {folder} is "
                          f"written: upload it later with `huggingface-cli upload {repo_id} {folder}`") from e
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
