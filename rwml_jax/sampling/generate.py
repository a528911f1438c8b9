"""`generate`: the functional entry point, and `SamplerPool`, the reusable samplers a caller holds."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from rwml_jax.models.config import ModelConfig
from rwml_jax.sampling.buckets import next_pow2
from rwml_jax.sampling.engine import Sampler
from rwml_jax.sampling.outputs import GenerationOutput

MIN_CAPACITY = 16


class SamplerPool:
    """The `size` most recently used `Sampler`s, keyed by (config, mesh, capacity, cache dtype, prompt
    buckets), each with a capacity of `max_new_tokens` rounded up to a power of two (>= 16). Whoever
    generates repeatedly holds one (e.g. `rwml_jax.train.policy.PolicySampler`), so repeated calls reuse
    compiled functions and KV caches; nothing is cached behind the caller's back.

    weight_format: the decode weight format of its samplers ("auto": `rwml_jax.platform`'s rule).
    """

    def __init__(self, size: int = 4, weight_format: str = "auto"):
        self.size, self.weight_format = int(size), weight_format
        self._samplers: collections.OrderedDict[tuple, Sampler] = collections.OrderedDict()

    def get(self, config: ModelConfig, max_new_tokens: int, *, mesh: Mesh | None = None,
            cache_dtype: str | jnp.dtype | None = None, prompt_buckets: Sequence[int] | None = None) -> Sampler:
        capacity = max(MIN_CAPACITY, next_pow2(int(max_new_tokens)))
        key = (config, mesh, capacity, None if cache_dtype is None else str(jnp.dtype(cache_dtype)),
               tuple(prompt_buckets) if prompt_buckets else None)
        if key in self._samplers:
            self._samplers.move_to_end(key)
            return self._samplers[key]
        sampler = Sampler(config, max_new_tokens=capacity, mesh=mesh, cache_dtype=cache_dtype,
                          prompt_buckets=prompt_buckets, weight_orientation=self.weight_format)
        self._samplers[key] = sampler
        while len(self._samplers) > self.size:
            self._samplers.popitem(last=False)
        return sampler


def generate(
    config: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int] | str],
    *,
    max_new_tokens: int,
    mesh: Mesh | None = None,
    cache_dtype: str | jnp.dtype | None = None,
    prompt_buckets: Sequence[int] | None = None,
    pool: SamplerPool | None = None,
    **sampling_kwargs: Any,
) -> GenerationOutput:
    """Sample continuations of a batch of prompts with a jitted prefill + on-device decode loop.

    Args:
      config, params: the decoder (`rwml_jax.models.load_pretrained`); params stacked or `Sampler.prepare`d.
      prompts: token-id lists of any lengths (or strings, encoded with `tokenizer` without special tokens).
      max_new_tokens: at most this many new tokens per row.
      mesh: device mesh (batch sharded over data x fsdp); None = default device.
      cache_dtype: KV cache dtype (default: the compute dtype; bfloat16 under the accelerator dtype policy).
      prompt_buckets: allowed padded prompt lengths (default powers of two from 16).
      pool: the `SamplerPool` to take the sampler from (reusing its compiled functions); None builds a
        sampler for this call alone (compiled afresh).
      sampling_kwargs: `Sampler.generate`'s options: temperature (0 = greedy), top_p, top_k, seed,
        stop_token_ids, stop_strings, tokenizer, stop_at_eos, num_samples (continuations per prompt, a GRPO
        group: each prompt is prefilled once).

    Returns a `GenerationOutput`: per row (index / iterate) a `GenerationResult` with `token_ids` ending
    with the stop token or the token that completed a stop string (included; `finish_reason` says which,
    or "length"), `logprobs` of those tokens under the tempered policy softmax(logits / temperature) (no top-k /
    top-p; temperature 1 when greedy: the GRPO importance-ratio denominator), `text` (decoded, special tokens skipped, cut before a stop
    string); plus padded batch arrays `tokens`, `logprobs`, `lengths`.
    """
    sampler = (pool if pool is not None else SamplerPool(size=1)).get(
        config, max_new_tokens, mesh=mesh, cache_dtype=cache_dtype, prompt_buckets=prompt_buckets)
    return sampler.generate(params, prompts, max_new_tokens=max_new_tokens, **sampling_kwargs)
