"""Jitted sampling: prefill + on-device decode loop with a KV cache, log-probs and stop conditions.

    from rwml_jax.sampling import generate, generate_chat, Sampler
    out = generate(config, params, [[1, 2, 3], [4, 5]], max_new_tokens=64, temperature=0.7, seed=1)
    out[0].token_ids, out[0].logprobs, out.tokens  # per row / padded batch

Modules: `engine` (Sampler: compiled prefill / decode), `filters` (greedy, temperature, top-k, top-p,
log-probs), `stop` (stop tokens and strings), `buckets` (shape padding), `generate` (functional entry),
`chat` (chat templates), `outputs` (result types).
"""

from rwml_jax.sampling.buckets import batch_bucket, prompt_bucket
from rwml_jax.sampling.chat import apply_chat_template, generate_chat
from rwml_jax.sampling.engine import Sampler
from rwml_jax.sampling.filters import SamplingMode
from rwml_jax.sampling.generate import SamplerPool, generate
from rwml_jax.sampling.outputs import GenerationOutput, GenerationResult

__all__ = [
    "GenerationOutput",
    "GenerationResult",
    "Sampler",
    "SamplingMode",
    "apply_chat_template",
    "batch_bucket",
    "generate",
    "generate_chat",
    "SamplerPool",
    "prompt_bucket",
]
