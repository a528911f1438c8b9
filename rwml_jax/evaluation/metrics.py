"""Scores of an evaluation from its per-episode records: success mean ± std over runs, per task type or
domain, τ²'s pass^k, invalid-action and invalid-tool-call rates.

A record (one episode, see `rwml_jax.evaluation.harness`) is a dict with at least: "run" (0..R-1),
"env", "task_id", "group" (ALFWorld task type / τ² domain), "status" ("ok" | "crashed" | "load_error"),
"success" (bool), "steps", "invalid_actions", and for τ² "tool_calls" and "invalid_tool_calls" (a dict
unparsable / unknown_tool / schema -> count).

Denominators: an episode whose game or task could not be loaded ("load_error") counts as a failure of
every run (it is in the split); an episode lost to a worker crash or timeout ("crashed") is left out of the
success rates and reported on its own (it says nothing about the policy; re-running the evaluation
replays it).
Standard deviations are over the R per-run success rates, with ddof=1 (sample std; 0 for R = 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Record = Mapping[str, Any]
INVALID_CALL_KINDS = ("unparsable", "unknown_tool", "schema")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1) of per-run values; std 0 for a single run; (nan, nan) for none."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def run_success_rates(records: Sequence[Record], runs: int) -> list[float]:
    """Success rate of each run 0..runs-1 over its scored episodes (everything except crashes)."""
    out = []
    for r in range(runs):
        scored = [x for x in records if x["run"] == r and x["status"] != "crashed"]
        out.append(sum(bool(x["success"]) for x in scored) / len(scored) if scored else math.nan)
    return out


def pass_hat_k(records: Sequence[Record], k: int) -> float:
    """τ²'s pass^k (`tau2.metrics.agent_metrics.pass_hat_k`, Yao et al. 2024): the mean over tasks of
    C(successes, k) / C(trials, k). Tasks with fewer than k scored trials (crashes) are left out."""
    from tau2.metrics.agent_metrics import is_successful, pass_hat_k as tau2_pass_hat_k  # τ² is optional

    by_task: dict[tuple[str, str], list[Record]] = {}
    for x in records:
        if x["status"] != "crashed":
            by_task.setdefault((x["group"], x["task_id"]), []).append(x)
    vals = [tau2_pass_hat_k(len(trials), sum(is_successful(float(t["reward"])) for t in trials), k)
            for trials in by_task.values() if len(trials) >= k]
    return float(np.mean(vals)) if vals else math.nan


def _rate(num: float, den: float) -> float:
    return num / den if den else math.nan


def summarize_group(records: Sequence[Record], runs: int, *, tau2: bool) -> dict[str, Any]:
    """Scores of one set of episodes (a whole split, one task type, one domain)."""
    rates = run_success_rates(records, runs)
    mean, std = mean_std([r for r in rates if not math.isnan(r)])
    scored = [x for x in records if x["status"] != "crashed"]
    wins = [x for x in scored if x["success"]]
    steps = sum(int(x["steps"]) for x in scored)
    out: dict[str, Any] = {
        "episodes": len(records),
        "tasks": len({x["task_id"] for x in records}),
        "success_mean": mean,
        "success_std": std,
        "success_per_run": rates,
        "successes": len(wins),
        "crashed": len(records) - len(scored),
        "load_errors": sum(x["status"] == "load_error" for x in records),
        "steps": steps,
        "invalid_actions": sum(int(x["invalid_actions"]) for x in scored),
        "invalid_action_rate": _rate(sum(int(x["invalid_actions"]) for x in scored), steps),
        "mean_steps_success": float(np.mean([x["steps"] for x in wins])) if wins else math.nan,
    }
    if tau2:
        calls = sum(int(x.get("tool_calls", 0)) for x in scored)
        bad = {k: sum(int(x.get("invalid_tool_calls", {}).get(k, 0)) for x in scored) for k in INVALID_CALL_KINDS}
        out.update(tool_calls=calls, invalid_tool_calls=bad, invalid_tool_call_rate=_rate(sum(bad.values()), calls))
        out["pass_hat_k"] = {str(k): pass_hat_k(records, k) for k in range(1, runs + 1)}
    return out


def summarize(records: Sequence[Record], runs: int, env: str, groups: Sequence[str]) -> dict[str, Any]:
    """{"overall": scores of every episode, "groups": {group: scores}} (groups in the given order, only
    those with episodes). For τ², "average" holds the unweighted mean over domains of success_mean,
    pass^k and the invalid tool-call rate (the paper's "avg" column)."""
    tau2 = env == "tau2"
    by = {g: [x for x in records if x["group"] == g] for g in groups}
    out: dict[str, Any] = {
        "overall": summarize_group(records, runs, tau2=tau2),
        "groups": {g: summarize_group(rs, runs, tau2=tau2) for g, rs in by.items() if rs},
    }
    if tau2 and out["groups"]:
        gs = list(out["groups"].values())
        per_run = np.nanmean(np.asarray([g["success_per_run"] for g in gs], np.float64), axis=0)
        m, s = mean_std(list(per_run))
        out["average"] = {
            "success_mean": m, "success_std": s,
            "pass_hat_k": {k: float(np.mean([g["pass_hat_k"][k] for g in gs])) for k in gs[0]["pass_hat_k"]},
            "invalid_tool_call_rate": float(np.nanmean([g["invalid_tool_call_rate"] for g in gs])),
        }
    return out


def pct(mean: float, std: float | None = None) -> str:
    """"41.3 ± 2.1" (percent) or "41.3"; "-" for nan."""
    if mean is None or math.isnan(mean):
        return "-"
    if std is None or math.isnan(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"
