"""The easy-sample filter's keep/drop rule (paper, Stage 1).

A filter model π′ (next-state SFT on the validation split) samples K predictions per training triplet; each is
scored with the world-model reward under the *stricter* filter thresholds (computed by `rwml_jax.rwml.rewards`,
not here). With r̄ the mean of a triplet's K rewards:

* the triplet is **easy** when r̄ ≥ τ_easy. τ_easy defaults to 1.0, "all K correct" (the paper prints
  τ_easy = 0.0, which read literally marks every triplet easy; config ``filter.tau_easy``). A tolerance of
  1e-9 absorbs float error in the mean (ten rewards of 1.0 or of 0.2-grid ROUGE values);
* an easy triplet is **kept** with probability p (``filter.keep_easy_prob``, paper 0.1); hard triplets are
  always kept.

The keep draw for an easy triplet is u(seed, id) < p with u a uniform number derived from a hash of the seed
and the triplet id: reproducible, independent of the order the triplets come in and of which other triplets
are present, so re-running the stage (or resuming it) keeps the same set. p = 0 drops every easy triplet,
p = 1 keeps every one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

EASY_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class FilterStats:
    """Counts of one filter pass. frac_easy = easy / total; frac_kept = kept / total."""

    total: int
    easy: int
    easy_kept: int
    hard: int
    kept: int
    tau_easy: float
    keep_easy_prob: float
    mean_reward: float

    @property
    def frac_easy(self) -> float:
        return self.easy / self.total if self.total else 0.0

    @property
    def frac_kept(self) -> float:
        return self.kept / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(frac_easy=self.frac_easy, frac_kept=self.frac_kept)
        return d


@dataclasses.dataclass(frozen=True)
class FilterResult:
    """kept_ids in input order; easy: id -> whether it was easy; mean_rewards: id -> r̄."""

    kept_ids: list[str]
    easy: dict[str, bool]
    mean_rewards: dict[str, float]
    stats: FilterStats


def _check_params(tau_easy: float, keep_easy_prob: float) -> None:
    if not 0.0 <= tau_easy <= 1.0:
        raise ValueError(f"tau_easy must be in [0, 1] (a mean reward threshold), got {tau_easy}")
    if not 0.0 <= keep_easy_prob <= 1.0:
        raise ValueError(f"keep_easy_prob must be in [0, 1], got {keep_easy_prob}")


def mean_rewards(rewards: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """r̄ per triplet id. Raises ValueError naming an id with no rewards or a reward outside [0, 1]."""
    out: dict[str, float] = {}
    for tid, rs in rewards.items():
        arr = np.asarray(rs, dtype=np.float64).reshape(-1)
        if arr.size == 0:
            raise ValueError(f"triplet {tid!r} has no filter rewards (expected K samples)")
        if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError(f"triplet {tid!r} has filter rewards outside [0, 1]: {arr.tolist()}")
        out[tid] = float(arr.mean())
    return out


def is_easy(mean_reward: float, tau_easy: float = 1.0) -> bool:
    """r̄ ≥ τ_easy (with EASY_TOLERANCE)."""
    return mean_reward >= tau_easy - EASY_TOLERANCE


def keep_uniform(seed: int, triplet_id: str) -> float:
    """The uniform number in [0, 1) that decides whether an easy triplet is kept."""
    digest = hashlib.sha256(f"rwml-easy-filter:{seed}:{triplet_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def filter_easy(rewards: Mapping[str, Sequence[float]], *, tau_easy: float = 1.0, keep_easy_prob: float = 0.1,
                seed: int = 0) -> FilterResult:
    """Apply the keep/drop rule to ``rewards`` (triplet id -> its K filter rewards, in [0, 1])."""
    _check_params(tau_easy, keep_easy_prob)
    means = mean_rewards(rewards)
    easy = {tid: is_easy(m, tau_easy) for tid, m in means.items()}
    kept = [tid for tid in means if not easy[tid] or keep_uniform(seed, tid) < keep_easy_prob]
    n_easy = sum(easy.values())
    kept_set = set(kept)
    stats = FilterStats(
        total=len(means), easy=n_easy, easy_kept=sum(1 for t in kept_set if easy[t]), hard=len(means) - n_easy,
        kept=len(kept), tau_easy=float(tau_easy), keep_easy_prob=float(keep_easy_prob),
        mean_reward=float(np.mean(list(means.values()))) if means else 0.0)
    return FilterResult(kept_ids=kept, easy=easy, mean_rewards=means, stats=stats)
