"""What the sampler returns: per-row results, also readable as padded batch arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from rwml_jax.sampling.state import FinishReason

# finish_reason values (see `FinishReason`)
STOP_TOKEN = FinishReason.STOP_TOKEN.label
STOP_STRING = FinishReason.STOP_STRING.label
LENGTH = FinishReason.LENGTH.label


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """One row: generated ids (ending with the stop token / the token completing a stop string, included),
    their log-probs under the tempered policy without top-k / top-p (float32 [n]), the decoded text (None without a tokenizer;
    special tokens skipped, cut before a stop string) and why it ended."""

    token_ids: list[int]
    logprobs: np.ndarray
    text: str | None
    finish_reason: str
    prompt_len: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """The rows of one `generate` call, in prompt order.

    Iterating / indexing gives `GenerationResult`s. Batch views: `tokens` [n, N] int32 (-1 after a row's
    end), `logprobs` [n, N] float32 (0 after the end), `lengths` [n] int32, `texts`, `finish_reasons`.
    N is the sampler's max_new_tokens capacity. `decode_steps` is how many tokens the longest row took.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    texts: list[str] | None
    finish_reasons: list[str]
    prompt_lengths: list[int]
    decode_steps: int

    def __len__(self) -> int:
        return len(self.finish_reasons)

    def __getitem__(self, i: int) -> GenerationResult:
        n = int(self.lengths[i])
        return GenerationResult(
            token_ids=[int(t) for t in self.tokens[i, :n]],
            logprobs=self.logprobs[i, :n].copy(),
            text=None if self.texts is None else self.texts[i],
            finish_reason=self.finish_reasons[i],
            prompt_len=self.prompt_lengths[i],
        )

    def __iter__(self) -> Iterator[GenerationResult]:
        return (self[i] for i in range(len(self)))

    @property
    def token_ids(self) -> list[list[int]]:
        return [[int(t) for t in self.tokens[i, : int(self.lengths[i])]] for i in range(len(self))]

    @property
    def num_generated(self) -> int:
        return int(self.lengths.sum())
