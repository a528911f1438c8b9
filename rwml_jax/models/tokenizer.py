"""Train a small byte-level BPE tokenizer with a ChatML chat template (the CPU demo's tokenizer).

The demo cannot download a pretrained tokenizer, so it trains one on its own corpus. The result is a
regular Hugging Face tokenizer folder: `transformers.AutoTokenizer.from_pretrained(path)` loads it and
`apply_chat_template` renders Qwen-style ChatML, exactly as for a hub model. The markup the agent and
the world model emit (`<think>`, `<action>`, `<next_state>` and their closing tags) are single tokens, so
a tiny model spends no capacity spelling them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MARKUP = ("<think>", "</think>", "<action>", "</action>", "<next_state>", "</next_state>",
          "<tool_call>", "</tool_call>")

# ChatML, as Qwen2.5 / Qwen3 render it (without the default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 2048):
    """Train byte-level BPE on `texts`, save to `out_dir` and return the `PreTrainedTokenizerFast`.

    Special ids: 0 = <|endoftext|> (padding), 1 = <|im_start|>, 2 = <|im_end|> (end of turn = EOS);
    the markup tokens take the last ids below `vocab_size`, so `len(tokenizer) == vocab_size`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKUP),
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    )
    # Markup tokens are added as *non-special* tokens (as Qwen3 does for <think>): they are atomic but
    # survive `decode(..., skip_special_tokens=True)`, which strips only padding and ChatML markers.
    fast.add_tokens([AddedToken(m, special=False, normalized=False) for m in MARKUP])
    fast.save_pretrained(os.fspath(out_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(out_dir))
