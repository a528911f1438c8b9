"""Gold replay of τ² tasks through `Tau2Env`, scored by τ²'s own evaluator.

For each task the gold actions of ``task.evaluation_criteria.actions`` are replayed in their order:

* an assistant action becomes an agent turn ``<tool_call>{"name": …, "arguments": …}</tool_call>``;
* a user action (telecom's device actions) becomes an agent message asking the user to do it, and a
  `ScriptedUser` turn holding that user-side tool call, followed by the user's "Done." once it ran;
* finally the agent sends one message containing every ``communicate_info`` string, and the user ends the
  conversation with ``###STOP###``.

The episode is then scored by τ²'s `evaluate_simulation` inside the adapter, exactly as for a policy
rollout: this checks the adapter end to end (parsing, tool execution, user-side tools, stop signal, scoring)
against what τ²'s evaluator gives the gold actions, 1.0 for every task.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rwml_jax.envs import TAU2_DOMAINS
from rwml_jax.envs.base import TaskSpec
from rwml_jax.envs.tau2_env import Tau2Env, load_tasks, task_splits
from rwml_jax.envs.tau2_gold import gold_script
from rwml_jax.envs.tau2_users import ScriptedUser

REPLAY_SPLIT = "base"  # every task of the domain (train ∪ test)


def replay_task(domain: str, task: Any, split: str = REPLAY_SPLIT) -> dict[str, Any]:
    """Replay one task; returns its row: id, reward, turns, invalid steps, termination reason, checks."""
    agent_turns, user_turns = gold_script(task)
    env = Tau2Env(
        ScriptedUser(user_turns),
        domain=domain,
        max_steps=len(agent_turns) + 1,
        max_messages=10 * (len(agent_turns) + len(user_turns)) + 10,
        max_errors=len(agent_turns) + 10,  # gold actions may legitimately fail (τ² then keeps going)
    )
    res = env.reset(TaskSpec(env="tau2", split=split, task_id=task.id, options=(("domain", domain),)))
    invalid = 0
    for turn in agent_turns:
        if res.done or res.truncated:
            break
        res = env.step(turn)
        invalid += not res.valid
    env.close()
    info = res.info
    rinfo = info.get("reward_info") or {}
    return {
        "task_id": task.id,
        "reward": float(res.reward) if (res.done or res.truncated) else 0.0,
        "termination_reason": info.get("termination_reason", "not_finished"),
        "agent_turns": len(agent_turns),
        "invalid_steps": invalid,
        "reward_basis": rinfo.get("reward_basis"),
        "reward_breakdown": rinfo.get("reward_breakdown"),
    }


def replay_domain(domain: str, limit: int | None = None) -> dict[str, Any]:
    tasks = list(load_tasks(domain, REPLAY_SPLIT).values())
    if limit is not None:
        tasks = tasks[:limit]
    splits = task_splits(domain)
    split_of = {tid: s for s in ("train", "test") for tid in splits.get(s, [])}
    t0 = time.perf_counter()
    rows = []
    for task in tasks:
        row = replay_task(domain, task)
        row["split"] = split_of.get(task.id, "-")
        rows.append(row)
    per_split = {
        s: {
            "tasks": sum(r["split"] == s for r in rows),
            "score_1": sum(r["split"] == s and r["reward"] == 1.0 for r in rows),
        }
        for s in ("train", "test")
    }
    return {
        "domain": domain,
        "split": REPLAY_SPLIT,
        "tasks": len(rows),
        "score_1": sum(r["reward"] == 1.0 for r in rows),
        "per_split": per_split,
        "seconds": round(time.perf_counter() - t0, 2),
        "failures": [r for r in rows if r["reward"] != 1.0],
        "rows": rows,
    }


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| domain | tasks | gold score 1.0 | train | test |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        tr, te = r["per_split"]["train"], r["per_split"]["test"]
        lines.append(
            f"| {r['domain']} | {r['tasks']} | {r['score_1']}/{r['tasks']} | "
            f"{tr['score_1']}/{tr['tasks']} | {te['score_1']}/{te['tasks']} |"
        )
    return "\n".join(lines)


def replay_tau2(domain: str, limit: int | None = None, json_out: str | None = None) -> int:
    """Replay gold actions of ``domain`` ("airline", "retail", "telecom" or "all"); print the table.

    limit: replay only the first ``limit`` tasks of each domain. json_out: also write the table (with every
    task's row) as JSON there. Returns 0 when every replayed task scores 1.0, else 1.
    """
    domains = list(TAU2_DOMAINS) if domain == "all" else [domain]
    for d in domains:
        if d not in TAU2_DOMAINS:
            print(f"error: unknown τ² domain {d!r}; choose one of {', '.join(TAU2_DOMAINS)} or all", file=sys.stderr)
            return 2
    results = [replay_domain(d, limit) for d in domains]
    print(format_table(results))
    for r in results:
        for f in r["failures"]:
            print(
                f"  {r['domain']} task {f['task_id']!r}: reward {f['reward']} "
                f"({f['termination_reason']}, breakdown {f['reward_breakdown']})"
            )
    if json_out:
        with open(json_out, "w") as fh:
            json.dump({"results": results}, fh, indent=2)
        print(f"wrote {json_out}")
    return 0 if all(r["score_1"] == r["tasks"] for r in results) else 1
