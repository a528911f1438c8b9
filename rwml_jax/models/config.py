"""Decoder configuration read from (and written back to) a Hugging Face `config.json`.

One frozen, hashable dataclass covers the supported families, so it can be a static argument of
`jax.jit`. The family differences the decoder cares about are flags here:

| family  | model_type | q/k/v bias           | o bias          | q/k RMSNorm | rope scaling         |
|---------|------------|----------------------|-----------------|-------------|----------------------|
| Qwen2   | qwen2      | always               | no              | no          | default / linear     |
| Qwen3   | qwen3      | `attention_bias`     | `attention_bias`| yes         | default / linear     |
| Llama 3 | llama      | `attention_bias`     | `attention_bias`| no          | "llama3" / linear    |
| Qwen3-MoE | qwen3_moe | `attention_bias`    | `attention_bias`| yes         | default / linear     |

Qwen3-MoE (`transformers.Qwen3MoeConfig`) adds the mixture-of-experts fields `num_experts` X,
`num_experts_per_tok` k, `moe_intermediate_size` (each expert's SwiGLU width), `norm_topk_prob`,
`decoder_sparse_step` and `mlp_only_layers`; layer i is sparse (router + experts, `rwml_jax.models.moe`)
when i is not in `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0, dense (SwiGLU of
`intermediate_size`) otherwise. `router_aux_loss_coef` and `output_router_logits` are training options of
transformers, not of the model: the updates take their own coefficient (`GRPOConfig` / `SFTConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from rwml_jax.platform import DTYPES

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of a Hugging Face model folder (FileNotFoundError naming the folder when absent)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"no config.json in {os.fspath(path)!r}: expected a Hugging Face model folder with "
            "config.json and *.safetensors (download one with `huggingface-cli download NAME "
            "--local-dir DIR`)"
        )
    with open(cfg_path) as f:
        return json.load(f)


class UnsupportedModelError(ValueError):
    """The checkpoint's family or an option of it is not implemented."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only LLM, plus the dtype policy it runs under.

    Shapes: `hidden_size` E, `num_attention_heads` H, `num_key_value_heads` K (H % K == 0; K == 1 is
    MQA), `head_dim` D (independent of E / H), `intermediate_size` F (SwiGLU width), `vocab_size` V.
    Dtype policy: parameters are stored in `param_dtype`; matmuls run in `compute_dtype`; RMSNorm,
    softmax and logits always accumulate in float32.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # Extra rope parameters (factor, low_freq_factor, ...) as a sorted tuple of pairs (hashable).
    rope_params: tuple[tuple[str, float], ...] = ()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Mixture of experts (qwen3_moe; num_experts == 0: every layer dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unknown model_type {self.model_type!r}; supported families: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2/Qwen2.5, Qwen3, Llama 3, Qwen3-MoE)"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {self.rope_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                                 f"{self.num_experts}]")
            if self.moe_intermediate_size <= 0 or self.decoder_sparse_step < 1:
                raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} and decoder_sparse_step="
                                 f"{self.decoder_sparse_step} must be >= 1")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(f"mlp_only_layers {bad} are not layers of a {self.num_hidden_layers}-layer model")

    # ----------------------------------------------------------------------------------------------
    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer: True where the MLP is the mixture of experts (transformers' rule, module docstring)."""
        return tuple(self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                     for i in range(self.num_hidden_layers))

    @property
    def is_moe(self) -> bool:
        return any(self.sparse_layers)

    @property
    def layer_runs(self) -> tuple[tuple[bool, int, int, int], ...]:
        """The layers as runs of one kind: (sparse, first layer, count, first index among that kind's
        layers), in order. A stacked parameter tree keeps each kind's layers in its own stack; each run is
        one `lax.scan` (`rwml_jax.models.decoder.run_layers`)."""
        runs: list[list] = []
        seen = {True: 0, False: 0}
        for i, sparse in enumerate(self.sparse_layers):
            if runs and runs[-1][0] == sparse:
                runs[-1][2] += 1
            else:
                runs.append([sparse, i, 1, seen[sparse]])
            seen[sparse] += 1
        return tuple(tuple(r) for r in runs)

    # ----------------------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        h, k = self.num_attention_heads, self.num_key_value_heads
        attn = e * d * (h + 2 * k) + h * d * e
        if self.qkv_bias:
            attn += d * (h + 2 * k)
        if self.o_bias:
            attn += e
        if self.qk_norm:
            attn += 2 * d
        mlp = 3 * e * f + (2 * f + e if self.mlp_bias else 0)
        n_sparse = sum(self.sparse_layers)
        moe = self.num_experts * (e + 3 * e * self.moe_intermediate_size)  # router + experts
        emb = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        per_layer = attn + 2 * e
        return (self.num_hidden_layers * per_layer + (self.num_hidden_layers - n_sparse) * mlp + n_sparse * moe
                + emb + e)

    @property
    def num_active_params(self) -> int:
        """Parameters one token passes through (`num_params` with only num_experts_per_tok experts of each
        sparse layer; = `num_params` for dense models)."""
        idle = self.num_experts - self.num_experts_per_tok
        return self.num_params - sum(self.sparse_layers) * idle * 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def rope_param(self, name: str, default: float | None = None) -> float:
        params = dict(self.rope_params)
        if name not in params:
            if default is None:
                raise UnsupportedModelError(f"rope type {self.rope_type!r} needs {name!r} in the config")
            return default
        return params[name]

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from a parsed HF `config.json` (transformers 4 or 5 layout)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unknown model_type {model_type!r} in config.json; supported families: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2/Qwen2.5, Qwen3, Llama 3, Qwen3-MoE)"
            )
        if d.get("use_sliding_window"):
            raise UnsupportedModelError("sliding-window attention (use_sliding_window=true) is not supported")
        if model_type == "qwen3_moe" and float(d.get("attention_dropout") or 0.0) != 0.0:
            raise UnsupportedModelError(f"attention_dropout={d['attention_dropout']}; dropout is not implemented")
        if d.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act={d['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        # transformers 5 keeps rope settings in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`.
        rope = dict(d.get("rope_parameters") or {})
        if not rope:
            rope = dict(d.get("rope_scaling") or {})
            rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_params = tuple(sorted((k, float(v)) for k, v in rope.items() if isinstance(v, (int, float))))
        heads = d["num_attention_heads"]
        attention_bias = bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        kw: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_params=rope_params,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
        )
        if model_type == "qwen3_moe":
            kw.update(
                num_experts=int(d.get("num_experts", d.get("num_local_experts", 128))),
                num_experts_per_tok=int(d.get("num_experts_per_tok", 8)),
                moe_intermediate_size=int(d.get("moe_intermediate_size", 768)),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                decoder_sparse_step=int(d.get("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(int(i) for i in (d.get("mlp_only_layers") or ())),
            )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "ModelConfig":
        return cls.from_hf_dict(read_config_json(path), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers reads back (both the 4.x and 5.x rope layouts)."""
        archs = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
        rope_parameters: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        rope_parameters.update(dict(self.rope_params))
        d: dict[str, Any] = dict(
            architectures=[archs[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters=rope_parameters,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            torch_dtype=self.param_dtype,
            use_cache=True,
        )
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.model_type in ("qwen2", "qwen3", "qwen3_moe"):
            d["use_sliding_window"] = False
        if self.model_type == "qwen3_moe":
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                     decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                     attention_dropout=0.0)
        return d
