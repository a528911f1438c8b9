"""Replaying ALFWorld walkthroughs through the adapter and the worker pool: a check that the engine, the data
and the adapter agree (every official game's walkthrough wins), and the workload of the scaling benchmark.

`replay_alfworld` keeps every pool slot busy: when a slot's game ends it is reset with the next game (in the
same `EnvPool.advance` round in which the other slots step), so 1..N workers all do the same total work.
Results are per game (`GameReplay`) and per task type (`ReplayReport.rows`). τ²-Bench replay lives in
`rwml_jax.envs.tau2_replay`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from rwml_jax.envs.alfworld_data import TASK_TYPES, BrokenGame, GameRef, load_game_json, scan_games
from rwml_jax.envs.base import TaskSpec
from rwml_jax.envs.pool import EnvPool

ALFWORLD_FACTORY = "rwml_jax.envs.alfworld_env:AlfworldEnv"
REPLAY_MAX_STEPS = 1000  # walkthroughs are never truncated by the step limit during replay


@dataclasses.dataclass
class GameReplay:
    task_id: str
    task_type: str
    won: bool
    steps: int  # walkthrough commands played
    walkthrough_len: int
    invalid: int  # commands the adapter flagged invalid
    error: str | None = None  # worker crash / timeout / engine exception


@dataclasses.dataclass
class ReplayReport:
    split: str
    games: list[GameReplay]
    seconds: float  # wall time of the replay (pool start excluded)
    env_steps: int  # step() calls answered by the pool (resets not counted)
    resets: int
    workers: int

    @property
    def wins(self) -> int:
        return sum(g.won for g in self.games)

    def rows(self) -> list[dict[str, Any]]:
        """Per task type (in ALFWorld's order), then a total row."""
        by_type: dict[str, list[GameReplay]] = collections.defaultdict(list)
        for g in self.games:
            by_type[g.task_type].append(g)
        rows = [{"task_type": t, "games": len(by_type[t]), "wins": sum(g.won for g in by_type[t])}
                for t in TASK_TYPES if by_type.get(t)]
        rows.append({"task_type": "total", "games": len(self.games), "wins": self.wins})
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "env": "alfworld",
            "split": self.split,
            "rows": self.rows(),
            "games": len(self.games),
            "wins": self.wins,
            "seconds": round(self.seconds, 3),
            "env_steps": self.env_steps,
            "resets": self.resets,
            "steps_per_second": round(self.env_steps / self.seconds, 3) if self.seconds > 0 else None,
            "workers": self.workers,
            "failures": [dataclasses.asdict(g) for g in self.games if not g.won],
        }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table | task type | games | wins | win rate |."""
    out = ["| task type | games | wins | win rate |", "|---|---:|---:|---:|"]
    for r in rows:
        rate = f"{100.0 * r['wins'] / r['games']:.1f}%" if r["games"] else "-"
        name = f"**{r['task_type']}**" if r["task_type"] == "total" else r["task_type"]
        out.append(f"| {name} | {r['games']} | {r['wins']} | {rate} |")
    return "\n".join(out)


def replay_games(pool: EnvPool, games: Sequence[GameRef], split: str,
                 progress: TextIO | None = None) -> ReplayReport:
    """Replay each game's walkthrough in `pool`, all slots busy; the pool's envs must be AlfworldEnv."""
    queue = collections.deque(games)
    n = pool.num_envs
    running: list[dict[str, Any] | None] = [None] * n
    done: list[GameReplay] = []
    env_steps = resets = 0
    t0 = time.perf_counter()

    def finish(i: int, won: bool, error: str | None = None) -> None:
        st = running[i]
        assert st is not None
        g: GameRef = st["game"]
        done.append(GameReplay(task_id=g.task_id, task_type=g.task_type, won=won, steps=st["idx"],
                               walkthrough_len=len(st["walk"]), invalid=st["invalid"], error=error))
        running[i] = None
        if progress is not None:
            mark = "won" if won else f"LOST{': ' + error.splitlines()[0] if error else ''}"
            progress.write(f"[{len(done)}/{len(games)}] {g.task_id}: {mark}\n")
            progress.flush()

    def spec(g: GameRef) -> TaskSpec:
        return TaskSpec("alfworld", split, g.task_id, options=(("max_steps", REPLAY_MAX_STEPS),))

    while queue or any(s is not None for s in running):
        # One concurrent round: empty slots start their next game while the others play their next command.
        items: list[TaskSpec | str | None] = [None] * n
        for i in range(n):
            st = running[i]
            if st is not None:
                items[i] = st["walk"][st["idx"]]
            elif queue:
                g = queue.popleft()
                items[i] = spec(g)
                walk = list(load_game_json(g.gamefile).get("walkthrough") or [])
                running[i] = {"game": g, "walk": walk, "idx": 0, "invalid": 0}
        upcoming = [spec(g) for g in itertools.islice(queue, n)]  # idle workers preload these
        for i, (item, res) in enumerate(zip(items, pool.advance(items, upcoming))):
            if res is None:
                continue
            st = running[i]
            assert st is not None
            if isinstance(item, TaskSpec):
                resets += 1
                if res.truncated or res.done or not st["walk"]:
                    finish(i, False, res.info.get("error") or "no walkthrough / finished at reset")
                continue
            env_steps += 1
            st["idx"] += 1
            st["invalid"] += int(not res.valid)
            if res.done or res.truncated or st["idx"] >= len(st["walk"]):
                won = bool(res.done and res.reward > 0 and res.info.get("won"))
                finish(i, won, res.info.get("error"))
    return ReplayReport(split=split, games=sorted(done, key=lambda r: r.task_id),
                        seconds=time.perf_counter() - t0, env_steps=env_steps, resets=resets,
                        workers=pool.num_workers)


def replay_alfworld(data: str | os.PathLike | None, split: str = "valid_seen", *, limit: int | None = None,
                    workers: int = 1, envs_per_worker: int = 1, task_types: Sequence[str] | None = None,
                    sample: str = "first", json_out: str | os.PathLike | None = None,
                    progress: TextIO | None = sys.stderr, memoize: bool = True,
                    mp_context: str = "spawn") -> ReplayReport:
    """Replay the walkthroughs of `split` under `data` and return the report (also written to `json_out`).

    limit: replay at most this many games, the first ones by task id (sample="first") or spread evenly over
    the sorted list (sample="spread", which covers every task type of a big split).
    A game file that cannot be loaded (truncated, malformed) is part of the report as a lost game whose
    error names the file; it counts in the denominator.
    """
    found, broken = scan_games(data, split, tuple(task_types) if task_types else None, full_check=True)
    games: list[GameRef | BrokenGame] = sorted([*found, *broken], key=lambda g: g.task_id)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if sample == "spread" and limit < len(games):
            stride = len(games) / limit
            games = [games[int(k * stride)] for k in range(limit)]
        elif sample in ("first", "spread"):
            games = games[:limit]
        else:
            raise ValueError(f"sample must be 'first' or 'spread', got {sample!r}")
    playable = [g for g in games if isinstance(g, GameRef)]
    lost = [GameReplay(task_id=g.task_id, task_type=g.task_type, won=False, steps=0, walkthrough_len=0, invalid=0,
                       error=f"cannot load {g.gamefile}: {g.error}") for g in games if isinstance(g, BrokenGame)]
    for g in lost:
        if progress is not None:
            progress.write(f"{g.task_id}: LOST: {g.error}\n")
    num_envs = max(1, min(len(playable), workers * envs_per_worker))
    num_workers = max(1, min(workers, num_envs))
    kwargs = {"data_dir": None if data is None else os.fspath(data), "max_steps": REPLAY_MAX_STEPS,
              "memoize": memoize}
    if playable:
        with EnvPool(ALFWORLD_FACTORY, num_envs=num_envs, num_workers=num_workers, factory_kwargs=kwargs,
                     mp_context=mp_context) as pool:
            report = replay_games(pool, playable, games[0].split, progress=progress)
    else:
        report = ReplayReport(split=games[0].split, games=[], seconds=0.0, env_steps=0, resets=0, workers=0)
    report.games = sorted([*report.games, *lost], key=lambda r: r.task_id)
    if json_out is not None:
        with open(json_out, "w") as f:
            json.dump(report.to_json(), f, indent=1)
    return report
