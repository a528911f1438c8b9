"""The compiled sampler: a jitted prefill and a jitted on-device decode loop over a preallocated KV cache.

    sampler = Sampler(config, max_new_tokens=256, mesh=mesh)
    out = sampler.generate(params, prompts, temperature=1.0, seed=step)   # -> GenerationOutput

One call:
1. `prepare(params)`: the stacked layer weights are converted to the sampler's decode weight format
   (`rwml_jax.sampling.weight_format`: per layer, q/k/v and gate/up fused; one jitted copy, placed in the
   mesh's shardings), so the decode loop runs the layers unrolled, never slices weights per step, and its
   skinny matmuls read the weights in the orientation the machine streams fastest (`weight_orientation`).
   The copy lives for the call only (pass `prepare`d params to skip it).
2. Prompts are left-padded to [B, P] (batch and prompt-length buckets, see `buckets`).
3. `prefill` (jit, cache donated): runs the P prompt slots through the model into cache slots [0, P), takes
   the logits of the last slot only, and samples token 0. With `num_samples` = n > 1 (GRPO groups) it runs
   the B / n distinct prompts once into a shared prefix (`models.decoder`, "Shared prefix") and copies their
   last logits to their n rows; the rows' cache then holds only their own N slots, and every decode step
   reads each prompt's keys and values once for its n rows.
4. `decode` (jit, state donated): one `lax.while_loop` on device; each iteration feeds every row's last
   token (one cache slot, all rows advance together), samples the next, records it and its log-prob, and
   checks the stop conditions. It exits as soon as every row is done (stop token, stop sequence,
   max_new_tokens), so a batch that finishes early costs no further steps. No host round trip per token.
5. The KV cache returned by `decode` is kept and donated to the next call of the same shape: it is
   allocated once per (B, P) and updated in place (`dynamic_update_slice` on donated buffers).

Shapes: B rows (a batch bucket, a multiple of the mesh's data x fsdp size), P prompt slots (a prompt
bucket), N = `max_new_tokens` capacity, S = P + N cache slots, L layers, K kv heads, D head_dim.
The carried state is a `DecodeState` (`rwml_jax.sampling.state`).
KV cache: per layer k [B, K, D, S] and v [B, K, S, D] in `cache_dtype` (see `models.decoder`), batch sharded over
(data, fsdp), kv heads over tensor when they divide it. With num_samples = n > 1 the rows' cache has N slots
and the prompts' shared prefix [B / n, K, D, P] / [B / n, K, P, D] lives for the call only (the cache
memory falls from B x (P + N) to B x N + B / n x P slots).

Compilations: one for `prepare` per Sampler; then two (prefill + decode) per distinct (batch bucket,
prompt bucket, num_samples, sampling mode, stop-condition size bucket). The sampling mode is greedy (temperature 0),
plain sampling, or sampling with top-k (per k) and/or top-p; temperature and top_p values, the seed and
max_new_tokens (up to the capacity) are runtime values and never recompile. A run with fixed settings whose
prompts fall in one bucket pair costs 3 compilations in total; `num_compilations` / `compile_seconds` count
them.

Multi-host: inputs are placed with `jax.device_put`, i.e. every process must pass the same full batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rwml_jax import platform
from rwml_jax import sharding as sh
from rwml_jax.models import decoder
from rwml_jax.models.config import ModelConfig
from rwml_jax.sampling import buckets, filters, stop
from rwml_jax.sampling.outputs import STOP_STRING, GenerationOutput
from rwml_jax.sampling.state import DecodeState, FinishReason
from rwml_jax.sampling.weight_format import DecodeWeights

_BATCH = ("data", "fsdp")
_DECODE = platform.ExecutionConfig()  # per-layer weights run as straight-line code; no backward, no remat


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A (data, fsdp, tensor) = (1, 1, 1) mesh on `device` (the default device)."""
    return sh.make_mesh(1, 1, 1, devices=[device or jax.devices()[0]])


def default_cache_dtype(config: ModelConfig) -> jnp.dtype:
    """The model's compute dtype: bfloat16 under the accelerator dtype policy, float32 on CPU.

    Keys and values are stored at the precision they were computed in, so the sampler's log-probs equal
    `forward`'s in the same dtype (the GRPO importance ratio compares the two). A float32 model on a GPU
    therefore keeps a float32 cache; pass `cache_dtype="bfloat16"` to halve its memory at that cost.
    """
    return jnp.dtype(config.compute_dtype)


@dataclasses.dataclass(frozen=True)
class _Key:
    batch: int
    prompt: int
    samples: int
    mode: filters.SamplingMode
    stop_shapes: tuple[tuple[int, ...], ...]


class Sampler:
    """A reusable sampler for one model config, mesh and `max_new_tokens` capacity (see module docstring).

    Args:
      config: the decoder config (static: part of every compiled function).
      max_new_tokens: capacity N; each call may ask for up to N new tokens.
      mesh: a ("data", "fsdp", "tensor") mesh; the batch is sharded over data x fsdp, parameters follow
        `rules`. None: the default device.
      cache_dtype: KV cache dtype (default: the compute dtype, see `default_cache_dtype`).
      prompt_buckets: allowed prompt slot counts P (default powers of two from 16, see `buckets`).
      rules: logical-axis rules (default `rwml_jax.sharding.DEFAULT_RULES`).
      weight_orientation: the decode weight format (`rwml_jax.sampling.weight_format`): "in_out",
        "out_in" or "out_in_reduce"; "auto" picks per machine and model size
        (`rwml_jax.platform.default_weight_format`). All give the same numbers up to float rounding.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        max_new_tokens: int,
        mesh: Mesh | None = None,
        cache_dtype: str | jnp.dtype | None = None,
        prompt_buckets: Sequence[int] | None = None,
        rules: Sequence[tuple[str, Any]] | None = None,
        weight_orientation: str = "auto",
    ):
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected >= 1")
        self.config = config
        self.max_new_tokens = int(max_new_tokens)
        self.mesh = mesh if mesh is not None else single_device_mesh()
        self.rules = tuple(rules if rules is not None else sh.DEFAULT_RULES)
        self.cache_dtype = jnp.dtype(cache_dtype) if cache_dtype is not None else default_cache_dtype(config)
        self.prompt_buckets = tuple(prompt_buckets) if prompt_buckets else None
        self.batch_multiple = int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        self.num_compilations = 0
        self.compile_seconds = 0.0
        self._executables: dict[_Key, tuple[Any, Any]] = {}
        self._caches: dict[tuple[int, int], dict[str, Any]] = {}
        self._layout_compiled: dict[tuple, Any] = {}
        self._stacked_shardings = decoder.param_shardings(config, self.mesh, self.rules)
        if weight_orientation == "auto":
            weight_orientation = platform.default_weight_format(self.mesh.devices.flat, config)
        self.weight_orientation = weight_orientation
        # fusing head-sharded weights would mix shards
        self.weights = DecodeWeights(config, weight_orientation, fuse=self.mesh.shape["tensor"] == 1)
        self._prepared_shardings = sh.logical_to_sharding(self.weights.logical_axes(), self.mesh, self.rules)
        self._to_layout = jax.jit(self.weights.convert, out_shardings=self._prepared_shardings)

    # ------------------------------------------------------------------------------------------ params
    def prepare(self, params: Any) -> Any:
        """The parameters in the sampler's decode weight format (`rwml_jax.sampling.weight_format`: per layer,
        projection weights in `weight_orientation` and, on a mesh without tensor parallelism, fused), placed in the
        mesh's shardings: one jitted copy of the layer weights (plus, for "in_out" with a tied head, a
        transposed copy of the embedding).

        `generate` calls this on every call with stacked params; callers that generate many times with the
        same params can call it once and pass the result instead (it holds a second copy of the weights,
        which is why the sampler does not keep one itself).
        """
        layers = params.get("layers")
        if isinstance(layers, (tuple, list)):
            if jax.tree.structure(params) != jax.tree.structure(self._prepared_shardings):
                raise ValueError(
                    "per-layer params must come from this sampler's `prepare` (the decode weight format for this "
                    f"config, mesh and weight orientation {self.weight_orientation!r}); pass the stacked params (from init_params / load_pretrained) instead"
                )
            return params
        expected = jax.tree.structure(self._stacked_shardings)
        if jax.tree.structure(params) != expected:
            raise ValueError(
                f"params do not match the config's parameter tree: got {jax.tree.structure(params)}, "
                f"expected {expected} (was the model loaded with a different config?)"
            )
        placed = jax.device_put(params, self._stacked_shardings)
        signature = tuple((a.shape, a.dtype) for a in jax.tree.leaves(placed))
        if signature not in self._layout_compiled:
            t0 = time.perf_counter()
            self._layout_compiled[signature] = self._to_layout.lower(placed).compile()
            self.num_compilations += 1
            self.compile_seconds += time.perf_counter() - t0
        return self._layout_compiled[signature](placed)

    def release(self) -> None:
        """Drop the kept KV caches (compiled code stays)."""
        self._caches.clear()

    # -------------------------------------------------------------------------------------- shardings
    def _kv_axis(self) -> Any:
        axis = dict(self.rules).get("kv_heads")
        if axis is None:
            return None
        names = axis if isinstance(axis, tuple) else (axis,)
        size = int(np.prod([self.mesh.shape[a] for a in names]))
        return axis if self.config.num_key_value_heads % size == 0 else None

    def _shardings(self, samples: int = 1) -> dict[str, Any]:
        m = self.mesh
        kv = NamedSharding(m, PartitionSpec(_BATCH, self._kv_axis(), None, None))
        L = self.config.num_hidden_layers
        rows = NamedSharding(m, PartitionSpec(_BATCH))
        rows2 = NamedSharding(m, PartitionSpec(_BATCH, None))
        cache = dict(
            k=tuple(kv for _ in range(L)),
            v=tuple(kv for _ in range(L)),
            mask=rows2,
            pos=rows,
            index=NamedSharding(m, PartitionSpec()),
        )
        prefix = dict(k=cache["k"], v=cache["v"], mask=rows2) if samples > 1 else None
        state = DecodeState(cache=cache, tokens=rows2, logprobs=rows2, window=rows2, last=rows, done=rows,
                            reason=rows, lengths=rows, step=NamedSharding(m, PartitionSpec()), prefix=prefix)
        return dict(cache=cache, state=state, rows=rows, rows2=rows2, repl=NamedSharding(m, PartitionSpec()))

    def _new_cache(self, batch: int, prompt: int) -> dict[str, Any]:
        """An empty cache of prompt + max_new_tokens slots per row (prompt 0: the rows' own slots only)."""
        c = self.config
        S = prompt + self.max_new_tokens
        zeros = jax.jit(
            lambda: decoder.init_cache(c, batch, S, self.cache_dtype, per_layer=True),
            out_shardings=self._shardings()["cache"],
        )
        return zeros()

    # ------------------------------------------------------------------------------------ device code
    def _advance(self, state: DecodeState, logits, seed, temperature, top_p, max_new, stop_ids, stop_seqs,
                 stop_lens, mode) -> DecodeState:
        """Sample one token per row from logits [B, V] and record it (shared by prefill and decode)."""
        B = logits.shape[0]
        step = state.step
        tok = filters.sample(logits, filters.row_keys(seed, step, B), mode, temperature, top_p)
        logp = filters.token_logprobs(logits, tok, temperature)
        live = ~state.done
        zero = jnp.zeros((), jnp.int32)
        window = stop.push_window(state.window, tok)
        tok_hit, seq_hit = stop.stop_hits(tok, window, stop_ids, stop_seqs, stop_lens)
        r = {k: jnp.int32(v) for k, v in FinishReason.__members__.items()}
        reason = jnp.where(tok_hit, r["STOP_TOKEN"], jnp.where(
            seq_hit, r["STOP_STRING"], jnp.where(step + 1 >= max_new, r["LENGTH"], r["NONE"])))
        reason = jnp.where(live, reason, state.reason)
        return state.replace(
            tokens=jax.lax.dynamic_update_slice(state.tokens, jnp.where(live, tok, -1)[:, None], (zero, step)),
            logprobs=jax.lax.dynamic_update_slice(state.logprobs, jnp.where(live, logp, 0.0)[:, None], (zero, step)),
            window=window,
            last=tok,
            done=state.done | (reason != r["NONE"]),
            reason=reason,
            lengths=state.lengths + live.astype(jnp.int32),
            step=step + 1,
        )

    def _prefill_fn(self, mode: filters.SamplingMode, window: int, samples: int):
        c, N, w = self.config, self.max_new_tokens, self.weights

        def prefill(lparams, cache, ids, mask, valid, seed, temperature, top_p, max_new, stop_ids, stop_seqs, stop_lens):
            B = valid.shape[0]  # ids, mask: [B / samples, P]
            empty = dict(mask=jnp.zeros_like(cache["mask"]), pos=jnp.zeros_like(cache["pos"]),
                         index=jnp.zeros_like(cache["index"]))
            prefix = None
            if samples == 1:
                hidden, cache = decoder.apply(c, lparams, ids, mask, cache=dict(cache, **empty), return_hidden=True,
                                              weights=w, execution=_DECODE)
                logits = decoder.lm_logits(c, lparams, hidden[:, -1], w)  # left padding: the last slot is real
            else:  # the distinct prompts into a prefix of P slots; the rows' cache starts empty
                prompt_cache = jax.lax.with_sharding_constraint(
                    decoder.init_cache(c, ids.shape[0], ids.shape[1], self.cache_dtype, per_layer=True),
                    self._shardings()["cache"])
                hidden, prompt_cache = decoder.apply(c, lparams, ids, mask, cache=prompt_cache, return_hidden=True,
                                                     weights=w, execution=_DECODE)
                logits = jnp.repeat(decoder.lm_logits(c, lparams, hidden[:, -1], w), samples, axis=0)
                prefix = dict(k=prompt_cache["k"], v=prompt_cache["v"], mask=prompt_cache["mask"])
                cache = dict(cache, **dict(empty, pos=jnp.repeat(prompt_cache["pos"], samples, axis=0)))
            state = DecodeState(
                cache=cache,
                tokens=jnp.full((B, N), -1, jnp.int32),
                logprobs=jnp.zeros((B, N), jnp.float32),
                window=jnp.full((B, window), -1, jnp.int32),
                last=jnp.zeros((B,), jnp.int32),
                done=~valid,
                reason=jnp.zeros((B,), jnp.int32),
                lengths=jnp.zeros((B,), jnp.int32),
                step=jnp.zeros((), jnp.int32),
                prefix=prefix,
            )
            return self._advance(state, logits, seed, temperature, top_p, max_new, stop_ids, stop_seqs, stop_lens, mode)

        return prefill

    def _decode_fn(self, mode: filters.SamplingMode):
        c, w = self.config, self.weights

        def decode(lparams, state, seed, temperature, top_p, max_new, stop_ids, stop_seqs, stop_lens):
            def cond(s):
                return (s.step < max_new) & ~jnp.all(s.done)

            def body(s):
                logits, cache = decoder.apply(c, lparams, s.last[:, None], None, cache=s.cache, prefix=s.prefix,
                                              weights=w, execution=_DECODE)
                return self._advance(s.replace(cache=cache), logits[:, 0], seed, temperature, top_p, max_new,
                                     stop_ids, stop_seqs, stop_lens, mode)

            return jax.lax.while_loop(cond, body, state)

        return decode

    def _compile(self, key: _Key, lparams, cache, args_prefill, args_decode):
        t0 = time.perf_counter()
        shd = self._shardings(key.samples)
        repl, rows, rows2 = shd["repl"], shd["rows"], shd["rows2"]
        scalars = (repl,) * 7  # seed, temperature, top_p, max_new, stop_ids, stop_seqs, stop_lens
        prefill = jax.jit(
            self._prefill_fn(key.mode, key.stop_shapes[1][1], key.samples),
            in_shardings=(self._prepared_shardings, shd["cache"], rows2, rows2, rows) + scalars,
            out_shardings=shd["state"],
            donate_argnums=(1,),
        )
        decode = jax.jit(
            self._decode_fn(key.mode),
            in_shardings=(self._prepared_shardings, shd["state"]) + scalars,
            out_shardings=shd["state"],
            donate_argnums=(1,),
        )
        with jax.set_mesh(self.mesh), sh.axis_rules(self.rules):
            prefill_exe = prefill.lower(lparams, cache, *args_prefill).compile()
            state_shape = jax.eval_shape(prefill, lparams, cache, *args_prefill)
            state_abstract = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state_shape, shd["state"]
            )
            decode_exe = decode.lower(lparams, state_abstract, *args_decode).compile()
        self.num_compilations += 2
        self.compile_seconds += time.perf_counter() - t0
        return prefill_exe, decode_exe

    # ------------------------------------------------------------------------------------------ public
    def generate(
        self,
        params: Any,
        prompts: Sequence[Sequence[int] | str],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
        stop_strings: Sequence[str] | str | None = None,
        tokenizer: Any = None,
        stop_at_eos: bool = True,
        num_samples: int = 1,
    ) -> GenerationOutput:
        """Generate continuations of `prompts` (token-id lists, or strings when a tokenizer is given).

        num_samples: continuations per prompt (a GRPO group). Rows come out prompt by prompt (row
        i * num_samples + j is sample j of prompt i), exactly the rows of `prompts` with each prompt
        repeated num_samples times and the same seed, but each prompt is prefilled once.

        max_new_tokens: at most this many tokens per row (default: the capacity). temperature 0 = greedy.
        stop_token_ids: extra stop tokens; with `stop_at_eos`, the config's and the tokenizer's EOS ids are
        added. Every row ends at its first stop (see `rwml_jax.sampling.stop`); the stop token (or the
        token completing a stop string) is the row's last token. Deterministic for a given seed.
        """
        c = self.config
        n_new = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= n_new <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}; this sampler allows 1..{self.max_new_tokens}")
        token_lists = _as_token_lists(prompts, tokenizer, c.vocab_size)
        G = int(num_samples)
        if G < 1:
            raise ValueError(f"num_samples={num_samples!r}; expected >= 1")
        mode = filters.sampling_mode(float(temperature), top_k, float(top_p), c.vocab_size)
        stop_ids = list(stop_token_ids)
        if stop_at_eos:
            stop_ids += list(c.eos_token_ids)
            if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
                stop_ids.append(int(tokenizer.eos_token_id))
        criteria = stop.build_stop_criteria(stop_ids, stop_strings, tokenizer, c.vocab_size)
        stop_arrays = criteria.device_arrays()

        n_prompts = len(token_lists)
        n_rows = n_prompts * G
        B_prompts = buckets.batch_bucket(n_prompts, self.batch_multiple) if G > 1 else buckets.batch_bucket(
            n_rows, self.batch_multiple)
        B = B_prompts * G if G > 1 else B_prompts
        P = buckets.prompt_bucket(max(len(t) for t in token_lists), self.prompt_buckets)
        ids, mask = buckets.left_pad(token_lists, P, B_prompts)
        valid = np.arange(B) < n_rows

        shd = self._shardings()
        lparams = self.prepare(params)
        put = jax.device_put
        dev_ids, dev_mask, dev_valid = put(ids, shd["rows2"]), put(mask, shd["rows2"]), put(valid, shd["rows"])
        scalars = tuple(put(np.asarray(x, dt), shd["repl"]) for x, dt in (
            (seed, np.int32), (temperature if temperature > 0 else 1.0, np.float32), (top_p, np.float32),
            (n_new, np.int32)))
        scalars += tuple(put(a, shd["repl"]) for a in stop_arrays)
        cache_key = (B, P) if G == 1 else (B, 0)  # shared prompts: the rows' own slots only
        cache = self._caches.pop(cache_key, None)
        if cache is None:
            cache = self._new_cache(*cache_key)
        key = _Key(B, P, G, mode, tuple(a.shape for a in stop_arrays))
        if key not in self._executables:
            self._executables[key] = self._compile(key, lparams, cache, (dev_ids, dev_mask, dev_valid) + scalars, scalars)
        prefill, decode = self._executables[key]
        state = prefill(lparams, cache, dev_ids, dev_mask, dev_valid, *scalars)
        state = decode(lparams, state, *scalars)
        self._caches[cache_key] = state.cache
        # rows sharded over data x fsdp span every host in a multi-process run: gathered, the same on each
        host = sh.to_host(dict(tokens=state.tokens, logprobs=state.logprobs, lengths=state.lengths,
                                   reason=state.reason, step=state.step))
        return _finish(host, n_rows, [len(t) for t in token_lists for _ in range(G)], criteria, tokenizer)


def _as_token_lists(prompts: Any, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of prompts (token-id lists or strings); got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to generate")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is a string; pass tokenizer=... or token-id lists")
            p = tokenizer.encode(p, add_special_tokens=False)
        p = [int(t) for t in np.asarray(p).reshape(-1)] if not isinstance(p, list) else p
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        out.append([int(t) for t in p])
    return out


def _finish(host: dict[str, np.ndarray], n_rows: int, prompt_lens: list[int], criteria: stop.StopCriteria,
            tokenizer: Any) -> GenerationOutput:
    tokens = np.array(host["tokens"][:n_rows])
    logprobs = np.array(host["logprobs"][:n_rows])
    lengths = np.array(host["lengths"][:n_rows])
    reasons = [FinishReason(int(r) or FinishReason.LENGTH).label for r in host["reason"][:n_rows]]
    texts = None if tokenizer is None else []
    for i in range(n_rows):
        n = int(lengths[i])
        text = None
        cut = stop.truncate_at_stop_string(tokenizer, tokens[i, :n].tolist(), criteria.strings) if criteria.strings else None
        if cut is not None:
            keep, text = cut
            tokens[i, keep:] = -1
            logprobs[i, keep:] = 0.0
            lengths[i] = keep
            reasons[i] = STOP_STRING
        if texts is not None:
            if text is None:
                text = tokenizer.decode(tokens[i, : int(lengths[i])].tolist(), skip_special_tokens=True)
            texts.append(text)
    return GenerationOutput(
        tokens=tokens, logprobs=logprobs, lengths=lengths, texts=texts, finish_reasons=reasons,
        prompt_lengths=prompt_lens, decode_steps=int(host["step"]),
    )
