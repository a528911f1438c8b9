"""Sim-to-real rewards for world-model RL (paper, Stage 2), and the LLM-as-a-judge baseline.

A world-model sample is a raw model output; its prediction is the text inside the LAST
``<next_state>…</next_state>`` block (`extract_next_state`). A missing, unclosed or empty block
scores 0 - there is no separate format reward - and is counted in the returned stats (and logged).

Rewards per next-state kind (`RewardConfig` holds the paper's defaults):

| kind            | env      | reward                                                              |
|-----------------|----------|---------------------------------------------------------------------|
| "observation"   | ALFWorld | 1 if d < 0.2 else 0,  d = 1 - cos(E(pred), E(real))                 |
| "user_reply"    | τ²       | 1 if d < 0.4 else 0                                                 |
| "tool_response" | τ²       | ROUGE-L F1(pred, real) rounded to the nearest multiple of 0.2       |

E is a frozen embedding model (`rwml_jax.models.load_embedder`); realised states are usually embedded
once per dataset (`rwml_jax.rwml.embed_cache.EmbeddingCache`) and passed in as vectors.

ROUGE variant (the paper names none): ROUGE-L F1 (longest common subsequence, so the order of JSON
fields counts), no stemming, on tokens ``[a-z0-9_]+`` of the lower-cased text - JSON punctuation
(``{ } [ ] " : ,``) is dropped and snake_case identifiers such as ``customer_id`` stay one token
(rouge-score's default tokenizer would split them in two). Rounding is to the nearest grid point
(ties round up), so results lie in {0, 0.2, 0.4, 0.6, 0.8, 1}.

Why the output is searched after ``</think>``: the prompt asks for reasoning in ``<think>`` and the
answer after it, so a ``<next_state>`` drafted inside the reasoning is not the answer. When a model
writes no ``</think>``, the whole output is searched.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rwml_jax.rwml.wm_prompts import TASK_STATUSES

log = logging.getLogger(__name__)

KINDS = ("observation", "user_reply", "tool_response")
# The reward a recipe's rewards.kind selects for the rwml stage's training: "embedding" (the paper's sim-to-real
# reward, table above) or "judge" (the LLM-as-a-judge ablation, `JudgeReward` below).
REWARD_KINDS = ("embedding", "judge")
NEXT_STATE_TAG = "next_state"
# The query instruction the authors' public scripts embed the real next state with (the prediction is embedded
# without one); `RewardConfig.realized_instruction = "scripts"` selects it.
SCRIPTS_INSTRUCTION = ("Given a reference text, judge whether the text mentions all important information in "
                       "the reference and the correct task-completion status")


# ---------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------

def parse_next_state(output: str, tag: str = NEXT_STATE_TAG) -> tuple[str | None, str]:
    """(prediction or None, status) for one raw output.

    status: "ok", "missing" (no opening tag), "unclosed" (the last opening tag has no closing tag
    after it) or "empty" (only whitespace inside). The prediction is stripped of outer whitespace.
    """
    if not isinstance(output, str):
        raise TypeError(f"model outputs must be strings, got {type(output).__name__}")
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    think_end = output.rfind("</think>")
    text = output[think_end + len("</think>"):] if think_end >= 0 else output
    start = text.rfind(open_tag)
    if start < 0:
        return None, "missing"
    body_start = start + len(open_tag)
    end = text.find(close_tag, body_start)
    if end < 0:
        return None, "unclosed"
    body = text[body_start:end].strip()
    if not body:
        return None, "empty"
    return body, "ok"


def extract_next_state(output: str, tag: str = NEXT_STATE_TAG) -> str | None:
    """The text inside the last ``<next_state>…</next_state>`` of `output`, or None (see `parse_next_state`)."""
    return parse_next_state(output, tag)[0]


def _parse_all(outputs: Sequence[str], tag: str) -> tuple[list[str | None], dict[str, int]]:
    preds, counts = [], {"ok": 0, "missing": 0, "unclosed": 0, "empty": 0}
    for out in outputs:
        pred, status = parse_next_state(out, tag)
        preds.append(pred)
        counts[status] += 1
    return preds, counts


def _log_unparsable(counts: Mapping[str, int], where: str) -> None:
    bad = counts["missing"] + counts["unclosed"] + counts["empty"]
    if bad:
        log.info("%s: %d of %d outputs unparsable (missing %d, unclosed %d, empty %d) -> reward 0", where, bad,
                 sum(counts.values()), counts["missing"], counts["unclosed"], counts["empty"])


# ---------------------------------------------------------------------------------------------------
# Embedding reward
# ---------------------------------------------------------------------------------------------------

def _as_list(x: Sequence[str], name: str) -> list[str]:
    if isinstance(x, str):
        raise TypeError(f"{name} must be a sequence of strings, not one string")
    return list(x)


def _realized_vectors(realized: Sequence[str] | np.ndarray, embedder: Any, n: int) -> np.ndarray:
    """Realised-state embeddings [n, dim]: given vectors (e.g. from an EmbeddingCache) or embedded now."""
    if isinstance(realized, np.ndarray) and realized.dtype != object:
        vecs = np.asarray(realized, np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != n:
            raise ValueError(f"realized embeddings have shape {vecs.shape}; expected [{n}, dim]")
        return vecs
    texts = _as_list(realized, "realized")
    if len(texts) != n:
        raise ValueError(f"{n} outputs but {len(texts)} realized states")
    return embedder.embed(texts)


def cosine_distances(pred_vecs: np.ndarray, real_vecs: np.ndarray) -> np.ndarray:
    """d = 1 - cos per row of two [n, dim] arrays (rows need not be normalised)."""
    p = np.asarray(pred_vecs, np.float64)
    r = np.asarray(real_vecs, np.float64)
    if p.shape != r.shape:
        raise ValueError(f"prediction embeddings {p.shape} and realised embeddings {r.shape} differ in shape")
    denom = np.maximum(np.linalg.norm(p, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    return 1.0 - np.sum(p * r, axis=1) / denom


def embedding_distances(outputs: Sequence[str], realized: Sequence[str] | np.ndarray, embedder: Any, *,
                        tag: str = NEXT_STATE_TAG) -> tuple[np.ndarray, dict[str, int]]:
    """(d [n] float64 with NaN for unparsable outputs, parse counts). Only parsed predictions are embedded."""
    outputs = _as_list(outputs, "outputs")
    real = _realized_vectors(realized, embedder, len(outputs))
    preds, counts = _parse_all(outputs, tag)
    dist = np.full(len(outputs), np.nan)
    ok = [i for i, p in enumerate(preds) if p is not None]
    if ok:
        pred_vecs = embedder.embed([preds[i] for i in ok])
        dist[ok] = cosine_distances(pred_vecs, real[ok])
    return dist, counts


def binarize(distances: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """1.0 where d < threshold, else 0.0 (NaN, i.e. unparsable, -> 0)."""
    d = np.asarray(distances, np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(d) & (d < threshold), 1.0, 0.0)


def sim_to_real_reward(outputs: Sequence[str], realized: Sequence[str] | np.ndarray, embedder: Any,
                       threshold: float, *, tag: str = NEXT_STATE_TAG,
                       stats: dict[str, Any] | None = None) -> np.ndarray:
    """Binarised sim-to-real reward [n] float64: 1.0 where 1 - cos(E(pred), E(real)) < threshold else 0.0.

    outputs: raw model outputs (the prediction is parsed from the last ``<next_state>`` block).
    realized: the real next states as texts, or their embeddings [n, dim] (from an `EmbeddingCache`).
    embedder: anything with ``embed(list[str]) -> np.ndarray [n, dim]`` (an `Embedder` or a cache).
    stats: if given, updated with parse counts ("ok", "missing", "unclosed", "empty") and the
      mean distance of parsed predictions.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0 (a cosine-distance bound), got {threshold}")
    dist, counts = embedding_distances(outputs, realized, embedder, tag=tag)
    _log_unparsable(counts, "sim_to_real_reward")
    if stats is not None:
        for k, v in counts.items():
            stats[k] = stats.get(k, 0) + v
        finite = dist[np.isfinite(dist)]
        stats["mean_distance"] = float(finite.mean()) if finite.size else float("nan")
    return binarize(dist, threshold)


# ---------------------------------------------------------------------------------------------------
# ROUGE reward
# ---------------------------------------------------------------------------------------------------

class JsonAwareTokenizer:
    """rouge-score tokenizer: lower-case, tokens are runs of [a-z0-9_] (JSON punctuation dropped)."""

    _TOKEN = re.compile(r"[a-z0-9_]+")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(text.lower())


_SCORERS: dict[tuple[str, bool], Any] = {}


class StemmingTokenizer(JsonAwareTokenizer):
    """`JsonAwareTokenizer` with rouge-score's Porter stemmer applied to each token."""

    def tokenize(self, text: str) -> list[str]:
        from nltk.stem import porter

        stem = porter.PorterStemmer().stem
        return [stem(t) if len(t) > 3 else t for t in super().tokenize(text)]


def rouge_f1(prediction: str, reference: str, variant: str = "rougeL", stemmer: bool = False) -> float:
    """ROUGE F1 of `prediction` against `reference` with `JsonAwareTokenizer` (variant: rougeL, rouge1, ...;
    stemmer: Porter-stem tokens longer than 3 characters, as rouge-score's own stemming does)."""
    if (variant, stemmer) not in _SCORERS:
        from rouge_score import rouge_scorer

        tok = StemmingTokenizer() if stemmer else JsonAwareTokenizer()
        _SCORERS[variant, stemmer] = rouge_scorer.RougeScorer([variant], use_stemmer=False, tokenizer=tok)
    return float(_SCORERS[variant, stemmer].score(reference, prediction)[variant].fmeasure)


def round_to_grid(x: np.ndarray | float, grid: float = 0.2) -> np.ndarray:
    """Round to the nearest multiple of `grid` in [0, 1], ties up: 0.29 -> 0.2, 0.3 -> 0.4, 0.5 -> 0.6."""
    if not 0 < grid <= 1:
        raise ValueError(f"grid must be in (0, 1], got {grid}")
    steps = np.floor(np.asarray(x, np.float64) / grid + 0.5 + 1e-9)
    return np.clip(steps * grid, 0.0, 1.0).round(12)


def rouge_reward(outputs: Sequence[str], realized: Sequence[str], *, grid: float = 0.2, variant: str = "rougeL",
                 tag: str = NEXT_STATE_TAG, stats: dict[str, Any] | None = None) -> np.ndarray:
    """ROUGE-L F1 of each parsed prediction against its realised state, rounded to the `grid` -> [n]."""
    outputs = _as_list(outputs, "outputs")
    realized = _as_list(realized, "realized")
    if len(outputs) != len(realized):
        raise ValueError(f"{len(outputs)} outputs but {len(realized)} realized states")
    preds, counts = _parse_all(outputs, tag)
    _log_unparsable(counts, "rouge_reward")
    if stats is not None:
        for k, v in counts.items():
            stats[k] = stats.get(k, 0) + v
    raw = np.array([rouge_f1(p, r, variant) if p is not None else 0.0 for p, r in zip(preds, realized)])
    return round_to_grid(raw, grid)


# ---------------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """World-model reward settings; defaults are the paper's training thresholds.

    The easy-sample filter uses the stricter `RewardConfig.filter_defaults()` (ALFWorld 0.1, τ² 0.15).
    tool_response: "rouge" (paper) or "embedding" (then `threshold_tool_response` applies).

    Details from the authors' public scripts (defaults = the paper's reading; see docs/method.md):
    realized_instruction: embed the *real* next state as a Qwen3-Embedding query with this instruction (the
      prediction without one); "" = both plain; "scripts" = `SCRIPTS_INSTRUCTION`. prediction_max_tokens: embed only the first N tokens (the
      embedder's tokenizer) of a prediction (scripts: 128 ALFWorld, 512 τ²); 0 = all (up to its max_length).
    think_penalty: subtracted when the output has no ``<think>`` block of more than `think_min_tokens`
      whitespace-separated words (scripts, τ²: 0.1 and 16). rouge_stemmer: Porter stemming in ROUGE (scripts).
    status_penalty: subtracted when the output's last line does not state the sample's true task status
      (`compute_rewards(task_statuses=...)`; scripts' τ² variant: 0.5).
    """

    threshold_observation: float = 0.2
    threshold_user_reply: float = 0.4
    tool_response: str = "rouge"
    threshold_tool_response: float = 0.4
    rouge_grid: float = 0.2
    rouge_variant: str = "rougeL"
    tag: str = NEXT_STATE_TAG
    realized_instruction: str = ""
    prediction_max_tokens: int = 0
    think_penalty: float = 0.0
    think_min_tokens: int = 16
    rouge_stemmer: bool = False
    status_penalty: float = 0.0

    def __post_init__(self) -> None:
        for name in ("threshold_observation", "threshold_user_reply", "threshold_tool_response"):
            v = getattr(self, name)
            if not 0 < v <= 2:
                raise ValueError(f"RewardConfig.{name}={v}: a cosine-distance threshold must be in (0, 2]")
        if self.tool_response not in ("rouge", "embedding"):
            raise ValueError(f"RewardConfig.tool_response={self.tool_response!r}; expected 'rouge' or 'embedding'")
        if self.realized_instruction == "scripts":
            object.__setattr__(self, "realized_instruction", SCRIPTS_INSTRUCTION)
        if not 0 < self.rouge_grid <= 1:
            raise ValueError(f"RewardConfig.rouge_grid={self.rouge_grid}; expected a value in (0, 1]")

    @classmethod
    def filter_defaults(cls) -> "RewardConfig":
        """The easy-sample filter's stricter thresholds (paper: ALFWorld 0.1, τ² 0.15)."""
        return cls(threshold_observation=0.1, threshold_user_reply=0.15)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "RewardConfig":
        """Build from a dict / ConfigDict section (e.g. ``config.rewards``); keys that are not
        RewardConfig fields are ignored, so the section may hold other settings (kind)."""
        names = {f.name for f in dataclasses.fields(cls)}
        items = d.items() if hasattr(d, "items") else dict(d).items()
        return cls(**{k: v for k, v in items if k in names})

    def threshold(self, kind: str) -> float:
        if kind == "observation":
            return self.threshold_observation
        if kind == "user_reply":
            return self.threshold_user_reply
        if kind == "tool_response":
            return self.threshold_tool_response
        raise ValueError(f"unknown next-state kind {kind!r}; expected one of {KINDS}")


@dataclasses.dataclass
class RewardBatch:
    """Rewards [n] float64 in input order, cosine distances [n] (NaN where not computed: unparsable
    outputs and ROUGE-scored samples), and stats (counts of each parse status overall and per kind,
    mean reward per kind)."""

    rewards: np.ndarray
    distances: np.ndarray
    stats: dict[str, Any]


def compute_rewards(outputs: Sequence[str], realized: Sequence[str], kinds: Sequence[str] | str, embedder: Any,
                    config: RewardConfig | None = None, *,
                    realized_embeddings: np.ndarray | None = None,
                    task_statuses: Sequence[str] | None = None) -> RewardBatch:
    """Per-sample world-model rewards, dispatched on each sample's next-state kind.

    outputs / realized / kinds: parallel sequences (kinds may be one string for all). All embedding
    samples are embedded in one call. realized_embeddings: optional [n, dim] realised-state vectors
    (rows of ROUGE-scored samples are ignored); without them the realised texts are embedded too.
    """
    config = config or RewardConfig()
    outputs = _as_list(outputs, "outputs")
    realized = _as_list(realized, "realized")
    n = len(outputs)
    kinds = [kinds] * n if isinstance(kinds, str) else list(kinds)
    if not (len(realized) == len(kinds) == n):
        raise ValueError(f"lengths differ: {n} outputs, {len(realized)} realized, {len(kinds)} kinds")
    for k in set(kinds):
        if k not in KINDS:
            raise ValueError(f"unknown next-state kind {k!r}; expected one of {KINDS}")

    rewards = np.zeros(n)
    distances = np.full(n, np.nan)
    preds, statuses = [], []
    for out in outputs:
        p, s = parse_next_state(out, config.tag)
        preds.append(p)
        statuses.append(s)
    rouge_kind = [k == "tool_response" and config.tool_response == "rouge" for k in kinds]
    emb_idx = [i for i in range(n) if not rouge_kind[i]]
    if emb_idx:
        ok = [i for i in emb_idx if preds[i] is not None]
        if ok:
            if realized_embeddings is not None:
                real = np.asarray(realized_embeddings, np.float32)
                if real.shape[0] != n:
                    raise ValueError(f"realized_embeddings has {real.shape[0]} rows; expected {n}")
                real = real[ok]
            elif config.realized_instruction:
                real = embedder.embed([realized[i] for i in ok], instruction=config.realized_instruction)
            else:
                real = embedder.embed([realized[i] for i in ok])
            pred_texts = cut_tokens([preds[i] for i in ok], embedder, config.prediction_max_tokens)
            distances[ok] = cosine_distances(embedder.embed(pred_texts), real)
            thr = np.array([config.threshold(kinds[i]) for i in ok])
            rewards[ok] = binarize(distances[ok], thr)
    for i in range(n):
        if rouge_kind[i] and preds[i] is not None:
            rewards[i] = float(round_to_grid(rouge_f1(preds[i], realized[i], config.rouge_variant, config.rouge_stemmer),
                                             config.rouge_grid))
    stats_extra: dict[str, Any] = {}
    if config.think_penalty:
        short = np.array([not has_long_think(o, config.think_min_tokens) for o in outputs], bool)
        rewards = rewards - config.think_penalty * short
        stats_extra["short_think"] = int(short.sum())
    if config.status_penalty and task_statuses is not None:
        wrong = np.array([not states_status(o, st) for o, st in zip(outputs, task_statuses)], bool)
        rewards = rewards - config.status_penalty * wrong
        stats_extra["wrong_status"] = int(wrong.sum())

    stats: dict[str, Any] = {"n": n, **stats_extra}
    for status in ("ok", "missing", "unclosed", "empty"):
        stats[status] = sum(s == status for s in statuses)
    stats["unparsable"] = n - stats["ok"]
    stats["mean_reward"] = float(rewards.mean()) if n else float("nan")
    for k in KINDS:
        sel = [i for i in range(n) if kinds[i] == k]
        if sel:
            stats[f"{k}/n"] = len(sel)
            stats[f"{k}/unparsable"] = sum(statuses[i] != "ok" for i in sel)
            stats[f"{k}/mean_reward"] = float(rewards[sel].mean())
    counts = {s: stats[s] for s in ("ok", "missing", "unclosed", "empty")}
    _log_unparsable(counts, "compute_rewards")
    return RewardBatch(rewards=rewards, distances=distances, stats=stats)


def cut_tokens(texts: list[str], embedder: Any, max_tokens: int) -> list[str]:
    """Each text cut to its first `max_tokens` tokens of the embedder's tokenizer (0: unchanged; an embedder
    without a ``tokenizer`` cuts at whitespace-separated words)."""
    if max_tokens <= 0:
        return texts
    tok = getattr(embedder, "tokenizer", None)
    if tok is None:
        return [" ".join(t.split()[:max_tokens]) for t in texts]
    ids = tok(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    return [tok.decode(x, skip_special_tokens=True) for x in ids]


_THINK = re.compile(r"<think>(.*?)</think>", re.S)


def has_long_think(output: str, min_tokens: int) -> bool:
    """Whether `output` holds a ``<think>…</think>`` block of more than `min_tokens` whitespace-separated words."""
    return any(len(m.split()) > min_tokens for m in _THINK.findall(output))


def states_status(output: str, status: str) -> bool:
    """Whether the last non-empty line of `output` names `status` ("successfully completed", ...) and no
    other of the three statuses."""
    lines = [x.strip().lower() for x in output.strip().splitlines() if x.strip()]
    last = lines[-1] if lines else ""
    named = [s for s in TASK_STATUSES if s in last]
    return named == [status]
