"""Task-success metrics for multi-trial agent evaluation.

pass^k (τ-bench, Yao et al. 2024, arXiv 2406.12045; the definition τ² uses): the chance that *all* k
i.i.d. trials of a task succeed, estimated per task from n ≥ k trials with c successes as
C(c, k) / C(n, k), then averaged over tasks. pass^1 is the mean success rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

SUCCESS_TOL = 1e-6  # τ²'s `is_successful`: reward within 1e-6 of 1.0


def is_success(reward: float | bool) -> bool:
    """A trial succeeds when its reward is 1.0 (within τ²'s tolerance); bools are taken as they are."""
    if isinstance(reward, bool):
        return reward
    return abs(float(reward) - 1.0) <= SUCCESS_TOL


def pass_hat_k_task(num_trials: int, num_successes: int, k: int) -> float:
    """C(c, k) / C(n, k) for one task; raises if n < k or the counts are inconsistent."""
    if k < 1:
        raise ValueError(f"pass^k needs k >= 1, got k={k}")
    if not 0 <= num_successes <= num_trials:
        raise ValueError(f"successes ({num_successes}) must lie in [0, trials={num_trials}]")
    if num_trials < k:
        raise ValueError(f"pass^{k} needs at least {k} trials per task, got {num_trials}")
    return math.comb(num_successes, k) / math.comb(num_trials, k)


def pass_hat_k(results: Mapping[str, Sequence[float | bool]], k: int) -> float:
    """Mean over tasks of C(c, k) / C(n, k).

    results: task id -> the rewards (or success flags) of that task's trials. Every task needs ≥ k trials;
    a task with fewer raises ValueError naming it.
    """
    if not results:
        raise ValueError("pass^k of an empty result set")
    per_task = []
    for task_id, rewards in results.items():
        n = len(rewards)
        if n < k:
            raise ValueError(f"task {task_id!r} has {n} trial(s); pass^{k} needs at least {k}")
        c = sum(is_success(r) for r in rewards)
        per_task.append(pass_hat_k_task(n, c, k))
    return sum(per_task) / len(per_task)


def group_by_task(records: Iterable[tuple[str, float | bool]]) -> dict[str, list[float | bool]]:
    """(task id, reward) records, e.g. one per finished episode, -> task id -> rewards."""
    out: dict[str, list[float | bool]] = {}
    for task_id, reward in records:
        out.setdefault(task_id, []).append(reward)
    return out


def pass_hat_ks(results: Mapping[str, Sequence[float | bool]], max_k: int | None = None) -> dict[int, float]:
    """pass^k for k = 1 .. max_k (default: the smallest trial count over tasks, as τ² does)."""
    if not results:
        raise ValueError("pass^k of an empty result set")
    min_n = min(len(v) for v in results.values())
    max_k = min_n if max_k is None else max_k
    return {k: pass_hat_k(results, k) for k in range(1, max_k + 1)}
