"""LLM-as-a-judge reward for world-model predictions: the paper's ablation baseline (`rewards.kind = "judge"`).

A judge model reads the real next state and the prediction (the text of the last ``<next_state>`` block, parsed
as for the sim-to-real reward) and answers a score 0-10 as ``<score>N</score>``; the reward is score / 10,
real-valued or binarised at a threshold. The paper reports that such rewards get hacked by generic
predictions; the rwml stage trains on it when a recipe selects it (the judge model: a local one served by
the project's sampler, or a litellm model, `rwml_jax.train.served_models.judge_generator`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rwml_jax.rwml.rewards import NEXT_STATE_TAG, _as_list, _log_unparsable, _parse_all

log = logging.getLogger(__name__)


JUDGE_SYSTEM = (
    "You are a strict evaluator of a world model. The world model predicts the next state of an environment "
    "(an observation, a user's reply or a tool's response). You compare its prediction with the state that "
    "really happened."
)

JUDGE_USER = """\
Real next state:
{real}

Predicted next state:
{pred}

How well does the prediction match the real next state in meaning and in the facts it states (objects, \
locations, values, whether the action succeeded)? Score from 0 (wrong or unrelated) to 10 (the same \
content). Answer with the score only, as <score>N</score>."""

# The closing tag may be missing at the very end: the sampler cuts its text before the stop string.
_SCORE = re.compile(r"<score>\s*(\d+(?:\.\d+)?)\s*(?:</score>|\Z)")


def judge_messages(prediction: str, real: str) -> list[dict[str, str]]:
    """Chat messages asking the judge to score one prediction."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_USER.format(real=real, pred=prediction)},
    ]


def parse_judge_score(text: str, scale: float = 10.0) -> float | None:
    """The judge's last ``<score>N</score>`` (or a trailing ``<score>N``) divided by `scale`, clipped to
    [0, 1]; None if absent."""
    found = _SCORE.findall(text)
    if not found:
        return None
    return float(min(max(float(found[-1]) / scale, 0.0), 1.0))


@dataclasses.dataclass
class JudgeReward:
    """LLM-as-a-judge reward with the project's sampler (the paper's ablation baseline).

    `generate_fn(messages_batch: list[list[dict]]) -> list[str]` produces one judge answer per chat;
    `from_model` builds it from a decoder (config, params, tokenizer) via `rwml_jax.sampling`. The
    real-valued reward is score/10 in [0, 1]; the binarised one is 1 where that is >= `binary_threshold`
    (the paper gives no value; 0.7 by default). An unparsable prediction scores 0 without a judge call;
    an unparsable judge answer scores 0 and is counted.
    """

    generate_fn: Any
    binary_threshold: float = 0.7
    tag: str = NEXT_STATE_TAG

    @classmethod
    def from_model(cls, config: Any, params: Any, tokenizer: Any, *, max_new_tokens: int = 32,
                   temperature: float = 0.0, binary_threshold: float = 0.7, **generate_kwargs: Any) -> "JudgeReward":
        """A judge that answers with `rwml_jax.sampling.generate_chat` (greedy by default).

        The tokenizer needs a chat template. generate_kwargs go to the sampler (seed, mesh, top_p,
        chat_template_kwargs such as {"enable_thinking": False} for Qwen3, ...).
        """
        from rwml_jax.sampling import SamplerPool, generate_chat

        generate_kwargs.setdefault("pool", SamplerPool())

        def generate_fn(messages_batch: list[list[dict[str, str]]]) -> list[str]:
            out = generate_chat(config, params, tokenizer, messages_batch, max_new_tokens=max_new_tokens,
                                temperature=temperature, stop_strings=["</score>"], **generate_kwargs)
            return _texts(out)

        return cls(generate_fn=generate_fn, binary_threshold=binary_threshold)

    def scores(self, outputs: Sequence[str], realized: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
        """(real-valued rewards [n] in [0, 1], stats)."""
        outputs = _as_list(outputs, "outputs")
        realized = _as_list(realized, "realized")
        if len(outputs) != len(realized):
            raise ValueError(f"{len(outputs)} outputs but {len(realized)} realized states")
        preds, counts = _parse_all(outputs, self.tag)
        _log_unparsable(counts, "judge_reward")
        ok = [i for i, p in enumerate(preds) if p is not None]
        rewards = np.zeros(len(outputs))
        bad_judge = 0
        if ok:
            answers = self.generate_fn([judge_messages(preds[i], realized[i]) for i in ok])
            if len(answers) != len(ok):
                raise RuntimeError(f"judge returned {len(answers)} answers for {len(ok)} prompts")
            for i, ans in zip(ok, answers):
                s = parse_judge_score(ans)
                if s is None:
                    bad_judge += 1
                else:
                    rewards[i] = s
        if bad_judge:
            log.warning("judge_reward: %d of %d judge answers had no <score>N</score> -> reward 0", bad_judge, len(ok))
        stats = dict(counts, n=len(outputs), unparsable=len(outputs) - counts["ok"], judge_unparsable=bad_judge,
                     mean_reward=float(rewards.mean()) if len(outputs) else float("nan"))
        return rewards, stats

    def binarize(self, rewards: np.ndarray) -> np.ndarray:
        """1.0 where the real-valued judge reward is >= `binary_threshold`, else 0.0."""
        return (np.asarray(rewards) >= self.binary_threshold).astype(np.float64)

    def __call__(self, outputs: Sequence[str], realized: Sequence[str], *, binary: bool = False) -> np.ndarray:
        """Real-valued judge rewards [n] in [0, 1], or the binarised ones with `binary=True`."""
        rewards, _ = self.scores(outputs, realized)
        return self.binarize(rewards) if binary else rewards


def _texts(out: Any) -> list[str]:
    """Completion texts from whatever the sampler returns (list of str, or an object/dict holding them)."""
    if isinstance(out, (list, tuple)) and all(isinstance(x, str) for x in out):
        return list(out)
    for key in ("texts", "completions", "text"):
        val = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if val is not None:
            return list(val)
    raise TypeError(f"cannot read completion texts from the sampler's {type(out).__name__} result")
