"""`rwml-jax sweep SWEEP_FILE`: run a recipe over a set of config points, sharing upstream stages, and
print one table of every point's results (docs/sweeps.md).

    rwml-jax sweep configs/sweeps/demo_rwml.py                   # run (or continue) the sweep
    rwml-jax sweep demo_rwml --parallel 2 --config.rwml.max_steps=8   # 2 points at once; an override for all
    rwml-jax sweep demo_rwml --dry-run                           # the points and their shared stages
    rwml-jax sweep demo_rwml --table                             # the table of a finished or partial sweep
"""

from __future__ import annotations

import argparse
import sys

from rwml_jax.config import ConfigError
from rwml_jax.train.sweep import SWEEP_MANIFEST, plan_sweep, resolve_sweep_file
from rwml_jax.train.sweep_run import SweepBusy, device_slots, run_sweep
from rwml_jax.train.sweep_table import write_table

SWEEPS_ROOT = "runs/sweeps"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a recipe over a sweep file's points; one table of their results",
                       description="Run every point of a sweep file (get_sweep() -> (recipe, points), built with "
                                   "rwml_jax.config.hyper). Points share the stage outputs their configs agree on; "
                                   "finished points are skipped, a failed point is recorded and the sweep goes on.")
    p.add_argument("sweep_file", help="a sweep file (path), or a name in configs/sweeps/")
    p.add_argument("--sweep-dir", default=None,
                   help=f"where the points' work dirs go (default {SWEEPS_ROOT}/<sweep file name>)")
    p.add_argument("--parallel", type=int, default=1,
                   help="points at once, each on a disjoint slice of the local GPUs / TPU chips (default 1)")
    p.add_argument("--table", action="store_true", help="only print (and write) the table of the sweep so far")
    p.add_argument("--dry-run", action="store_true", help="validate every point and print the plan; run nothing")
    p.epilog = "Any --config.KEY=VALUE arguments override the recipe for every point."
    p.set_defaults(func=_cmd_sweep, accepts_config_overrides=True)


def _print_plan(plan) -> None:
    print(f"sweep of {plan.recipe} in {plan.sweep_dir}: {len(plan.points)} points")
    for p in plan.points:
        print(f"  {p.name}: {' '.join(p.args)}")
    runs = plan.runs_per_stage()
    print("stage outputs: " + ", ".join(f"{s} x{n}" + (" (shared by every point)" if n == 1 and len(plan.points) > 1 else "")
                                        for s, n in runs.items()))


def _print_table(sweep_dir) -> int:
    md, data = write_table(sweep_dir)
    print(md)
    print(f"\nwritten: {sweep_dir}/table.md, table.json" + (f", {data['plot']} ({data['main_metric']})" if data["plot"] else ""))
    if any(c.startswith("eval ") for c in data["columns"]):
        print(f"agent success per point, the paper's layout: rwml-jax compare {sweep_dir}")
    statuses = [r["status"] for r in data["rows"]]
    print(f"{statuses.count('done')} of {len(statuses)} points done"
          + "".join(f", {statuses.count(s)} {s}" for s in dict.fromkeys(statuses) if s != "done"))
    return 0 if all(s == "done" for s in statuses) else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        sweep_dir = Path(args.sweep_dir) if args.sweep_dir else Path(SWEEPS_ROOT) / resolve_sweep_file(args.sweep_file).stem
        if args.table:
            if not (sweep_dir / SWEEP_MANIFEST).is_file():
                print(f"rwml-jax: no sweep in {sweep_dir} yet (no {SWEEP_MANIFEST})", file=sys.stderr)
                return 2
            return _print_table(sweep_dir)
        plan = plan_sweep(args.sweep_file, sweep_dir, args.config_overrides)
    except ConfigError as e:
        print(f"rwml-jax: {e}", file=sys.stderr)
        return 2
    _print_plan(plan)
    if args.dry_run:
        return 0

    try:
        run_sweep(plan, slots=device_slots(args.parallel))
    except (SweepBusy, ValueError) as e:  # ValueError: --parallel does not fit the local devices
        print(f"rwml-jax: {e}", file=sys.stderr)
        return 2
    print()
    return _print_table(plan.sweep_dir)
