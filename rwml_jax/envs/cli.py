"""`rwml-jax envs {replay,play,generate}`: check, play and generate the host-side environments.

  rwml-jax envs replay --env alfworld --data $ALFWORLD_DATA [--split valid_seen] [--json OUT]
                       [--limit N] [--workers N]
  rwml-jax envs replay --env tau2 --domain retail [--json OUT] [--limit N]
  rwml-jax envs play --env alfworld --data DIR [--split valid_seen] [--game PATH]
  rwml-jax envs generate --out DIR --num N --seed S
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any

from rwml_jax.envs import ENV_NAMES
from rwml_jax.envs.alfworld_data import (
    SPLITS,
    TASK_TYPES,
    AlfworldDataError,
    list_games,
)
from rwml_jax.envs.alfworld_env import AlfworldEnv
from rwml_jax.envs.alfworld_gen import generate_games
from rwml_jax.envs.base import TaskSpec
from rwml_jax.envs.replay import format_table, replay_alfworld


def add_parser(subparsers: Any) -> None:
    envs = subparsers.add_parser("envs", help="replay, play and generate ALFWorld / τ²-Bench environments",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = envs.add_subparsers(dest="envs_command", metavar="ACTION", required=True)

    rp = sub.add_parser("replay", help="replay gold walkthroughs / actions and print a table of wins")
    rp.add_argument("--env", choices=list(ENV_NAMES), required=True, help="which environment to replay")
    rp.add_argument("--data", default=None,
                    help="ALFWorld data folder (official $ALFWORLD_DATA layout, the offline copy, or generated "
                         "games); default: $ALFWORLD_DATA")
    rp.add_argument("--split", default="valid_seen",
                    help=f"ALFWorld split: one of {list(SPLITS)} (or id / ood); default valid_seen")
    rp.add_argument("--task-types", nargs="+", choices=list(TASK_TYPES), default=None, metavar="TYPE",
                    help="replay only these ALFWorld task types")
    rp.add_argument("--domain", choices=["airline", "retail", "telecom", "all"], default=None,
                    help="τ²-Bench domain, or all three (with --env tau2)")
    rp.add_argument("--json", dest="json_out", default=None, help="also write the table (and failures) as JSON")
    rp.add_argument("--limit", type=int, default=None, help="replay at most N games / tasks")
    rp.add_argument("--sample", choices=["first", "spread"], default="first",
                    help="with --limit: the first N games by id, or N spread over the whole split")
    rp.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                    help="worker processes for the ALFWorld engine (default min(2, cores))")
    rp.add_argument("--no-memoize", action="store_true",
                    help="run the unmodified engine (no cached PDDL translation / grammar parsing)")
    rp.add_argument("--quiet", action="store_true", help="no per-game progress lines on stderr")
    rp.set_defaults(func=_replay)

    pl = sub.add_parser("play", help="play an ALFWorld game in the terminal")
    pl.add_argument("--env", choices=["alfworld"], default="alfworld", help="environment (only alfworld)")
    pl.add_argument("--data", default=None, help="ALFWorld data folder (default: $ALFWORLD_DATA)")
    pl.add_argument("--split", default="valid_seen", help="split to pick a game from (default valid_seen)")
    pl.add_argument("--game", default=None,
                    help="a game: path to game.tw-pddl / its trial folder, or a task id '<task>/<trial>'; "
                         "default: a random game of --split")
    pl.add_argument("--task-types", nargs="+", choices=list(TASK_TYPES), default=None, metavar="TYPE",
                    help="pick the random game among these task types")
    pl.add_argument("--seed", type=int, default=None, help="seed for picking the random game")
    pl.add_argument("--max-steps", type=int, default=50, help="step limit of the episode (default 50)")
    pl.set_defaults(func=_play)

    gp = sub.add_parser("generate", help="generate small solvable ALFWorld games (offline demo / CI data)")
    gp.add_argument("--out", required=True, help="output folder (becomes a split folder of games)")
    gp.add_argument("--num", type=int, default=12, help="number of games, cycling through the task types")
    gp.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same games)")
    gp.add_argument("--task-types", nargs="+", choices=list(TASK_TYPES), default=None, metavar="TYPE",
                    help="task types to cycle through (default: all six)")
    gp.set_defaults(func=_generate)


def _replay(args: argparse.Namespace) -> int:
    if args.env == "tau2":
        if args.domain is None:
            print("error: --env tau2 needs --domain {airline,retail,telecom,all}", file=sys.stderr)
            return 2
        from rwml_jax.envs.tau2_replay import replay_tau2

        return int(replay_tau2(args.domain, args.limit, args.json_out) or 0)

    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        report = replay_alfworld(args.data, args.split, limit=args.limit, workers=args.workers,
                                 task_types=args.task_types, sample=args.sample, json_out=args.json_out,
                                 progress=None if args.quiet else sys.stderr, memoize=not args.no_memoize)
    except (AlfworldDataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = args.data or os.environ.get("ALFWORLD_DATA", "$ALFWORLD_DATA")
    print(f"ALFWorld walkthrough replay of {where}, split {report.split}: {report.wins}/{len(report.games)} won "
          f"({report.env_steps} steps in {report.seconds:.1f} s, {report.workers} worker(s))")
    print(format_table(report.rows()))
    for g in report.games:
        if not g.won:
            print(f"  not won: {g.task_id} ({g.steps}/{g.walkthrough_len} steps, {g.invalid} invalid)"
                  f"{': ' + g.error.splitlines()[0] if g.error else ''}")
    if args.json_out:
        print(f"wrote {args.json_out}")
    return 0 if report.wins == len(report.games) else 1


def _play(args: argparse.Namespace) -> int:
    try:
        if args.game is None:
            games = list_games(args.data, args.split, args.task_types)
            task_id = random.Random(args.seed).choice(games).task_id
        else:
            task_id = args.game
        env = AlfworldEnv(args.data, max_steps=args.max_steps)
        res = env.reset(TaskSpec("alfworld", args.split, task_id))
    except (AlfworldDataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[{res.info['task_type']}] {res.info['task_id']}")
    print("Type a command; 'help' lists the admissible commands, 'quit' ends.\n")
    print(res.observation)
    try:
        while True:
            try:
                command = input("> ").strip()
            except EOFError:
                print()
                break
            if command in ("quit", "exit", "q"):
                break
            if command in ("help", "?", ""):
                print("Admissible commands:\n  " + "\n  ".join(env.admissible_commands))
                continue
            res = env.step(command)
            print(res.observation + ("" if res.valid else "   [invalid action]"))
            if res.done or res.truncated:
                outcome = "You won!" if res.done and res.reward > 0 else \
                    f"Step limit ({args.max_steps}) reached."
                print(f"\n{outcome} reward={res.reward} steps={env.steps_taken}")
                break
    except KeyboardInterrupt:
        print()
    finally:
        env.close()
    return 0


def _generate(args: argparse.Namespace) -> int:
    if args.num < 1:
        print(f"error: --num must be >= 1, got {args.num}", file=sys.stderr)
        return 2
    games = generate_games(args.out, args.num, seed=args.seed, task_types=args.task_types)
    counts: dict[str, int] = {}
    for g in games:
        counts[g.task_type] = counts.get(g.task_type, 0) + 1
    print(f"wrote {len(games)} solvable games to {args.out} (index: {os.path.join(args.out, 'generation.json')})")
    print(json.dumps(counts, indent=1))
    return 0
