"""Sentence-embedding models in JAX: BERT-family sentence-transformers and decoder embedders.

`load_embedder(path)` reads a model folder without torch and returns an `Embedder` whose
`embed(texts) -> np.ndarray [n, dim]` gives L2-normalised rows (float32).

The folders understood (sentence-transformers with `modules.json`, or plain Hugging Face BERT / decoder
folders) and how they are read are described in `rwml_jax.models.embedder_folder`.

How a call runs (the design's "embedding rewards precomputed on the accelerator mesh"): texts are
tokenised on the host (repeated texts once), sorted by length and cut into calls of about
`tokens_per_call` padded tokens (`plan_calls`): a call is padded on the right to a bucket length (a few
fixed lengths, see `bucket_length`) and has a power-of-two row count that is a multiple of the mesh's
batch-axis size, so `jax.jit` compiles few shapes. The jitted encoder runs with the batch sharded over
the mesh's ("data", "fsdp") axes and parameters placed by their logical axis names. All calls are
dispatched before the first result is fetched, so host padding of call i+1 overlaps the device work
of call i.

Decoder embedders use right padding: with causal attention the padding after a sequence cannot change
its hidden states, and last-token pooling picks the last real token of each row (left-padded
batches are handled by `pool` too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from transformers import AutoTokenizer

from rwml_jax import platform
from rwml_jax import sharding as sh
from rwml_jax.models import bert, decoder
from rwml_jax.models.embedder_folder import (
    BERT_TYPES,
    MINILM_ALIASES,
    POOLING_MODES,
    EmbedderConfigError,
    display_name,
    load_decoder_backbone,
    load_dense,
    plan_folder,
    read_json,
    resolve_embedder_path,
    weights_fingerprint,
)

__all__ = ["MINILM_ALIASES", "POOLING_MODES", "Embedder", "EmbedderConfigError", "EncodeFn", "bucket_length",
           "bucket_rows", "l2_normalize", "load_embedder", "plan_calls", "pool", "qwen3_instruction_prompt",
           "resolve_embedder_path"]


def qwen3_instruction_prompt(task: str) -> str:
    """The Qwen3-Embedding query prefix: "Instruct: {task}\\nQuery:" (the text follows directly)."""
    return f"Instruct: {task}\nQuery:"


# ---------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------

def pool(hidden: jax.Array, mask: jax.Array, modes: Sequence[str]) -> jax.Array:
    """Pool token states [B, S, E] with `mask` [B, S] (1 = pool this token) -> [B, len(modes) * E].

    Modes follow sentence-transformers' Pooling (concatenated in the order given, which the loader
    keeps in sentence-transformers' order): cls = first pooled token; max; mean; mean_sqrt_len_tokens
    (sum / sqrt(count)); weightedmean (weights 1, 2, ... counted from each row's first real token);
    lasttoken = the last position whose mask is 1 (correct for left- and right-padded rows).
    """
    S = hidden.shape[1]
    m = mask.astype(jnp.float32)
    h32 = hidden.astype(jnp.float32)
    pos = jnp.arange(S)[None, :]
    outs = []
    for mode in modes:
        if mode == "cls":
            first = jnp.argmax(mask, axis=1)
            outs.append(jnp.take_along_axis(h32, first[:, None, None], axis=1)[:, 0])
        elif mode == "max":
            outs.append(jnp.max(jnp.where(m[..., None] > 0, h32, -jnp.inf), axis=1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = jnp.einsum("bse,bs->be", h32, m)
            count = jnp.maximum(m.sum(axis=1, keepdims=True), 1e-9)
            outs.append(total / (count if mode == "mean" else jnp.sqrt(count)))
        elif mode == "weightedmean":
            start = jnp.argmax(mask, axis=1)[:, None]
            w = m * (pos + 1 - start).astype(jnp.float32)
            outs.append(jnp.einsum("bse,bs->be", h32, w) / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-9))
        elif mode == "lasttoken":
            last = jnp.max(jnp.where(mask.astype(bool), pos, -1), axis=1)
            last = jnp.where(last < 0, S - 1, last)
            outs.append(jnp.take_along_axis(h32, last[:, None, None], axis=1)[:, 0])
        else:
            raise EmbedderConfigError(f"unknown pooling mode {mode!r}; supported: {POOLING_MODES}")
    return jnp.concatenate(outs, axis=-1)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows divided by max(||row||, eps) (torch.nn.functional.normalize semantics)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


# ---------------------------------------------------------------------------------------------------
# Bucketing
# ---------------------------------------------------------------------------------------------------

def bucket_length(n: int, max_length: int, granularity: int = 8) -> int:
    """The padded length for a batch whose longest row has `n` tokens.

    Up to 128 tokens lengths are multiples of `granularity`; past that the step doubles whenever the
    length doubles (16 up to 256, 32 up to 512, ...), so padding stays under `granularity` tokens or
    1/8 of the row: 24 distinct shapes up to 256 tokens, 32 up to 512. Never exceeds `max_length`.
    """
    step, limit = granularity, 128
    while n > limit:
        step, limit = step * 2, limit * 2
    return min(max(step, -(-n // step) * step), max_length)


def bucket_rows(n: int, batch_size: int, multiple: int) -> int:
    """Row count for a call of `n` texts: the next power of two times `multiple` that holds them,
    capped at `batch_size` rounded up to `multiple`."""
    cap = -(-batch_size // multiple) * multiple
    rows = multiple
    while rows < n:
        rows *= 2
    return min(rows, cap)


def plan_calls(lengths: Sequence[int], *, batch_size: int, tokens_per_call: int, max_length: int,
               multiple: int = 1, granularity: int = 8, min_fill: float = 0.8) -> list[tuple[np.ndarray, int, int]]:
    """Split texts of the given token counts into jitted calls: [(indices, rows, seq_len), ...].

    Texts are sorted longest first and taken in order; a call's length is the bucket of its longest
    text (`bucket_length`) and its row count the largest power-of-two multiple of `multiple` with
    rows * length <= `tokens_per_call` (at least `multiple`, at most `batch_size`). So neighbouring
    texts of similar length share a call, every call holds about the same number of tokens, and the
    shapes come from a small set (about one row count per length bucket). Where a few long texts
    would pad many shorter ones (fewer than `min_fill` of the call's slots hold real tokens), the call
    takes fewer rows: the largest power of two that reaches `min_fill`, else the smallest.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    cap = -(-batch_size // multiple) * multiple
    calls = []
    i = 0
    while i < len(order):
        seq = bucket_length(int(lengths[order[i]]), max_length, granularity)
        rows = multiple
        while rows * 2 <= cap and rows * 2 * seq <= tokens_per_call:
            rows *= 2
        while rows > multiple:
            fill = lengths[order[i:i + rows]].sum() / (rows * seq)
            if fill >= min_fill:
                break
            rows //= 2
        idx = order[i:i + rows]
        calls.append((idx, bucket_rows(len(idx), rows, multiple), seq))
        i += len(idx)
    return calls


# ---------------------------------------------------------------------------------------------------
# The embedder
# ---------------------------------------------------------------------------------------------------

EncodeFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass
class Embedder:
    """A frozen sentence-embedding model on a mesh. Use `load_embedder` to build one.

    `embed(texts)` -> float32 [n, dim], rows L2-normalised (a zero vector only if the model maps a
    text to exactly zero). `identity` is a hex digest of everything that changes the numbers
    (weights fingerprint, config, pooling, max length, dtype): cache keys use it.
    """

    name: str
    kind: str  # "bert" | "decoder"
    tokenizer: Any
    encode: EncodeFn  # (params, ids [B,S], attention_mask [B,S], pool_mask [B,S]) -> [B, dim]
    params: Any
    mesh: Mesh
    dim: int
    max_length: int
    batch_size: int
    pad_token_id: int
    pooling_modes: tuple[str, ...]
    include_prompt: bool = True
    lowercase: bool = False
    normalized_in_model: bool = True
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    default_prompt: str | None = None  # raw prefix for calls that name none (load_embedder(instruction=...))
    identity: str = ""
    bucket_granularity: int = 8
    tokens_per_call: int = 0  # 0: `platform.embedder_tokens_per_call` per device
    matmul_params: int = 0  # parameters in per-token matmuls (for FLOP accounting)
    _jitted: Any = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        batch_axes = ("data", "fsdp")
        self._row_multiple = int(np.prod([self.mesh.shape[a] for a in batch_axes if a in self.mesh.shape]))
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec(batch_axes, None))
        if not self.tokens_per_call:
            self.tokens_per_call = platform.embedder_tokens_per_call(self.mesh.devices.flat) * self._row_multiple
        param_shardings = jax.tree_util.tree_map(lambda a: a.sharding, self.params)
        encode = self.encode

        def run(params, ids, mask, pool_mask):
            return l2_normalize(encode(params, ids, mask, pool_mask))

        # The (small) result is replicated, so every process of a multi-host run can read all rows.
        self._jitted = jax.jit(
            run,
            in_shardings=(param_shardings, self._batch_sharding, self._batch_sharding, self._batch_sharding),
            out_shardings=NamedSharding(self.mesh, PartitionSpec()),
        )

    def _put(self, host: np.ndarray) -> jax.Array:
        """A host batch (identical on every process) as a global array sharded over the batch axes."""
        return jax.make_array_from_callback(host.shape, self._batch_sharding, lambda idx: host[idx])

    # -- host side ---------------------------------------------------------------------------------
    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None,
                       instruction: str | None = None) -> str:
        """The text prefix for a call: `instruction` (Qwen3-Embedding format), a raw `prompt`, a named
        prompt from config_sentence_transformers.json, else the embedder's default (the `instruction`
        given to `load_embedder`, or the model's default prompt name)."""
        given = [x is not None for x in (prompt, prompt_name, instruction)]
        if sum(given) > 1:
            raise ValueError("pass at most one of prompt, prompt_name and instruction")
        if instruction is not None:
            return qwen3_instruction_prompt(instruction)
        if prompt is not None:
            return prompt
        if prompt_name is None and self.default_prompt is not None:
            return self.default_prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise KeyError(f"prompt_name {name!r} is not among the model's prompts {sorted(self.prompts)}")
        return self.prompts[name]

    def tokenize(self, texts: Sequence[str], prefix: str = "") -> list[list[int]]:
        """Token ids per text (special tokens added, truncated to `max_length`)."""
        if isinstance(texts, str):
            raise TypeError("embed()/tokenize() take a list of strings, not a single string")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        batch = [prefix + t for t in texts]
        if self.lowercase:
            batch = [t.lower() for t in batch]
        enc = self.tokenizer(batch, truncation=True, max_length=self.max_length, padding=False,
                             add_special_tokens=True)
        return enc["input_ids"]

    def _prompt_length(self, prefix: str) -> int:
        """Tokens of the prompt alone, minus a trailing special token (sentence-transformers' rule)."""
        if not prefix or self.include_prompt:
            return 0
        ids = self.tokenize([prefix])[0]
        if ids and ids[-1] in set(getattr(self.tokenizer, "all_special_ids", [])):
            return len(ids) - 1
        return len(ids)

    def embed(self, texts: Sequence[str], *, prompt: str | None = None, prompt_name: str | None = None,
              instruction: str | None = None) -> np.ndarray:
        """Embed `texts` -> float32 [len(texts), dim], rows L2-normalised, in input order.

        Repeated texts are embedded once (a group of G predictions often holds duplicates).
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings, not a single string")
        texts = list(texts)
        prefix = self.resolve_prompt(prompt, prompt_name, instruction)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        first: dict[str, int] = {}
        inverse = np.array([first.setdefault(t, len(first)) if isinstance(t, str) else -1 for t in texts])
        unique = list(first) if (inverse >= 0).all() else texts  # non-strings: let tokenize() name them
        ids = self.tokenize(unique, prefix)
        vecs = self.embed_token_ids(ids, prompt_length=self._prompt_length(prefix))
        return vecs if unique is texts else vecs[inverse]

    def embed_token_ids(self, ids: Sequence[Sequence[int]], prompt_length: int = 0) -> np.ndarray:
        """Embed pre-tokenised rows (each at most `max_length` ids) -> float32 [n, dim]."""
        lengths = np.array([len(x) for x in ids])
        if lengths.size and lengths.max() > self.max_length:
            raise ValueError(f"a row has {lengths.max()} tokens; max_length is {self.max_length}")
        calls = plan_calls(lengths, batch_size=self.batch_size, tokens_per_call=self.tokens_per_call,
                           max_length=self.max_length, multiple=self._row_multiple,
                           granularity=self.bucket_granularity)
        pending = []
        for idx, rows, seq in calls:
            tok = np.full((rows, seq), self.pad_token_id, np.int32)
            mask = np.zeros((rows, seq), np.int32)
            for r, j in enumerate(idx):
                tok[r, :lengths[j]] = ids[j]
                mask[r, :lengths[j]] = 1
            pool_mask = mask.copy()
            if prompt_length:
                # Keep at least the last token, so a text shorter than the prompt still pools something.
                keep = np.minimum(prompt_length, np.maximum(lengths[idx] - 1, 0))
                for r, k in enumerate(keep):
                    pool_mask[r, :k] = 0
            pending.append((idx, self._jitted(self.params, self._put(tok), self._put(mask), self._put(pool_mask))))
        out = np.empty((len(ids), self.dim), np.float32)
        for idx, dev in pending:
            out[idx] = sh.to_host(dev)[: len(idx)]  # rows span every host in a multi-process run
        return out

    def __call__(self, texts: Sequence[str], **kw: Any) -> np.ndarray:
        return self.embed(texts, **kw)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

def _place(host: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda h, s: jax.make_array_from_callback(np.shape(h), s, lambda idx, h=h: np.asarray(h)[idx]),
        host, shardings,
    )


def load_embedder(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    dtype: str = "float32",
    batch_size: int = 128,
    max_length: int | None = None,
    bucket_granularity: int = 8,
    tokens_per_call: int | None = None,
    instruction: str | None = None,
) -> Embedder:
    """Load an embedding model folder (see the module docstring) onto `mesh`.

    path: a model folder, "minilm" or a cached hub name (`resolve_embedder_path`).
    mesh: a ("data", "fsdp", "tensor") mesh (default: all devices on the data axis); the batch is
      sharded over data x fsdp, parameters follow `rwml_jax.sharding.DEFAULT_RULES`.
    dtype: parameter and matmul dtype ("float32"; "bfloat16" on accelerators). LayerNorm/RMSNorm
      statistics, softmax and pooling stay float32.
    batch_size: at most this many texts per jitted call (rounded up to a multiple of the mesh's batch size).
    tokens_per_call: padded tokens per jitted call (default 2048 per batch-axis device on CPU, 32768 on
      accelerators). On CPU small calls win: XLA gives each call one scratch arena, and an arena over
      glibc's 32 MiB mmap limit is page-faulted afresh on every call (measured: 114k faults per
      128 x 64-token call, ~150 at 16 x 64).
    bucket_granularity: padded lengths are multiples of this up to 128 tokens (see `bucket_length`).
    instruction: a default Qwen3-Embedding instruction for every call ("Instruct: {instruction}\nQuery:"
      before each text); part of `identity`. None/"" = no prefix (symmetric state similarity).
    max_length: token limit per text (default: the model's `max_seq_length`, else its max positions).
    """
    path = resolve_embedder_path(path)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = plan_folder(path)
    mesh = mesh if mesh is not None else sh.make_mesh()

    tok_dir = plan.transformer_dir if os.path.isfile(os.path.join(plan.transformer_dir, "tokenizer_config.json")) \
        or os.path.isfile(os.path.join(plan.transformer_dir, "tokenizer.json")) else path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    hf_cfg = read_json(os.path.join(plan.transformer_dir, "config.json"))
    model_max = int(hf_cfg.get("max_position_embeddings", 512))
    tok_max = getattr(tokenizer, "model_max_length", None)
    if max_length is None:
        max_length = plan.max_length or min(model_max, tok_max if tok_max and tok_max < 10**9 else model_max)
    if max_length > model_max:
        raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings={model_max}")

    if plan.model_type in BERT_TYPES:
        config = bert.BertConfig.from_pretrained(plan.transformer_dir, param_dtype=dtype, compute_dtype=dtype)
        shardings = sh.logical_to_sharding(bert.param_logical_axes(config), mesh, sh.DEFAULT_RULES)
        _, backbone = bert.load_bert(plan.transformer_dir, dtype, shardings=shardings)
        hidden = config.hidden_size
        matmul_params = config.matmul_params
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id

        def backbone_fn(p, ids, mask):
            return bert.apply(config, p, ids, mask)
    else:
        dconfig, backbone = load_decoder_backbone(plan.transformer_dir, dtype, mesh)
        hidden = dconfig.hidden_size
        e, f, d = dconfig.hidden_size, dconfig.intermediate_size, dconfig.head_dim
        matmul_params = dconfig.num_hidden_layers * (
            e * d * (dconfig.num_attention_heads * 2 + 2 * dconfig.num_key_value_heads) + 3 * e * f)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = dconfig.pad_token_id if dconfig.pad_token_id is not None else 0

        def backbone_fn(p, ids, mask):
            out, _ = decoder.apply(dconfig, p, ids, mask, return_hidden=True)
            return out

    dense_params, dense_acts = [], []
    for ddir in plan.dense_dirs:
        dp, act = load_dense(ddir, dtype)
        dense_params.append(_place(dp, jax.tree_util.tree_map(lambda _: NamedSharding(mesh, PartitionSpec()), dp)))
        dense_acts.append(act)
    dim = hidden * len(plan.pooling)
    for dp in dense_params:
        if dp["kernel"].shape[0] != dim:
            raise EmbedderConfigError(f"Dense module expects {dp['kernel'].shape[0]} inputs, pooling gives {dim}")
        dim = dp["kernel"].shape[1]
    modes = plan.pooling

    def encode(params, ids, mask, pool_mask):
        h = backbone_fn(params["backbone"], ids, mask)
        x = pool(h, pool_mask, modes)
        for dp, act in zip(params["dense"], dense_acts):
            x = x @ dp["kernel"].astype(jnp.float32)
            if "bias" in dp:
                x = x + dp["bias"].astype(jnp.float32)
            x = act(x)
        return x

    ident = hashlib.sha256(json.dumps(dict(
        kind=plan.model_type, config=hf_cfg, pooling=modes, include_prompt=plan.include_prompt,
        dense=len(plan.dense_dirs), max_length=max_length, lowercase=plan.lowercase, dtype=dtype,
        instruction=instruction or "",
        weights=weights_fingerprint(plan.transformer_dir),
        dense_weights=[weights_fingerprint(d) for d in plan.dense_dirs],
    ), sort_keys=True, default=str).encode()).hexdigest()[:16]

    return Embedder(
        name=display_name(path),
        kind="bert" if plan.model_type in BERT_TYPES else "decoder",
        tokenizer=tokenizer,
        encode=encode,
        params={"backbone": backbone, "dense": dense_params},
        mesh=mesh,
        dim=dim,
        max_length=int(max_length),
        batch_size=batch_size,
        pad_token_id=int(pad_id),
        pooling_modes=modes,
        include_prompt=plan.include_prompt,
        lowercase=plan.lowercase,
        normalized_in_model=plan.normalize,
        prompts=plan.prompts,
        default_prompt_name=plan.default_prompt_name,
        default_prompt=qwen3_instruction_prompt(instruction) if instruction else None,
        identity=ident,
        bucket_granularity=bucket_granularity,
        tokens_per_call=int(tokens_per_call or 0),
        matmul_params=matmul_params,
    )
