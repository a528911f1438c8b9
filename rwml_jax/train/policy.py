"""The policy / world model as the stages use it: chat prompts in, sampled completions out.

`PolicySampler` owns the tokenizer side (chat template, truncation, stop ids) and calls the jitted
sampler (`rwml_jax.sampling`) on the run's mesh. Completions carry the token ids and the sampler's
log-probs, which the GRPO update uses as `old_logp`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from rwml_jax.sampling import SamplerPool, generate
from rwml_jax.train.encode import encode_prompt, stop_ids

Message = dict[str, Any]


@dataclasses.dataclass
class Completion:
    """One sampled reply: `ids` [n] (ending with the stop token when one was produced), `logprobs` [n]
    float32 under the tempered policy (softmax(logits / temperature), no top-p), `text` decoded without special tokens, `truncated`: cut at the
    token budget before any stop (a thinking model that ran out of room)."""

    ids: list[int]
    logprobs: np.ndarray
    text: str
    truncated: bool = False


class PolicySampler:
    """Samples replies of `(model_config, params)` for chat prompts; see `sample` / `generate_fn`.
    It holds its own `SamplerPool` (compiled samplers and KV caches reused across calls); weight_format:
    the sampler's decode weight format (`rwml_jax.platform.ExecutionConfig.weight_format`)."""

    def __init__(self, model_config: Any, tokenizer: Any, mesh: Any, *, max_prompt_tokens: int,
                 max_new_tokens: int, cache_dtype: str | None = None, weight_format: str = "auto",
                 template_kwargs: dict[str, Any] | None = None):
        self.pool = SamplerPool(weight_format=weight_format)
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.cache_dtype = cache_dtype
        self.stop_token_ids = stop_ids(tokenizer, model_config)
        self.template_kwargs = template_kwargs  # extra chat-template variables (Qwen3: enable_thinking)

    def encode(self, messages: Sequence[Message]) -> list[int]:
        return encode_prompt(self.tokenizer, messages, self.max_prompt_tokens, self.template_kwargs)

    def sample_ids(self, params: Any, prompts: Sequence[Sequence[int]], *, temperature: float, top_p: float = 1.0,
                   seed: int = 0, max_new_tokens: int | None = None, n: int = 1) -> list[Completion]:
        """Sample `n` completions per prompt (token-id lists of any lengths), prompt by prompt; each prompt
        is prefilled once for its n samples."""
        out = generate(
            self.model_config, params, [list(p) for p in prompts],
            max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed, stop_token_ids=self.stop_token_ids, mesh=self.mesh, cache_dtype=self.cache_dtype,
            num_samples=n, pool=self.pool,
        )
        return [Completion(r.token_ids, np.asarray(r.logprobs, np.float32), self.decode(r.token_ids),
                           r.finish_reason == "length") for r in out]

    def sample(self, params: Any, conversations: Sequence[Sequence[Message]], *, n: int = 1, temperature: float,
               top_p: float = 1.0, seed: int = 0, max_new_tokens: int | None = None) -> tuple[list[list[int]], list[list[Completion]]]:
        """`n` completions of each conversation -> (prompt ids per conversation, completions[conv][k])."""
        prompt_ids = [self.encode(m) for m in conversations]
        flat = self.sample_ids(params, prompt_ids, temperature=temperature, top_p=top_p, seed=seed,
                               max_new_tokens=max_new_tokens, n=n)
        return prompt_ids, [flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in ids if i not in self.stop_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_fn(self, params: Any, *, temperature: float, top_p: float = 1.0, seed: int = 0,
                    with_ids: bool = False):
        """A rollout `generate_fn`: list of chat prompts -> list of {"text", "num_tokens"} (+ "prompt_ids",
        "token_ids" and "logprobs" when `with_ids`: what policy RL trains on); every call draws a fresh
        seed from `seed`."""
        calls = [0]

        def fn(prompts: list[Any]) -> list[dict[str, Any]]:
            calls[0] += 1
            ids, comps = self.sample(params, prompts, temperature=temperature, top_p=top_p,
                                     seed=(seed * 1_000_003 + calls[0]) % 2**31)
            out = [{"text": c[0].text, "num_tokens": len(c[0].ids), "truncated": c[0].truncated} for c in comps]
            if with_ids:
                for o, p, c in zip(out, ids, comps):
                    o.update(prompt_ids=p, token_ids=c[0].ids, logprobs=c[0].logprobs.tolist())
            return out

        return fn
