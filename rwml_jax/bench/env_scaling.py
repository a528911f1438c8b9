"""Environment throughput of the worker pool: ALFWorld steps/s with 1 vs N worker processes.

Workload: a rollout batch of `--envs` ALFWorld environments (default 32; the collect stage runs up to
`collect.max_live_episodes` = 256) replays the walkthroughs of `--games` games (default 64, spread over the
task types of the offline valid_seen split) through `EnvPool`, stepped in lockstep rounds as a policy would
step them; a slot whose game ends starts the next game in the same round, and the next queued games are
passed as `upcoming` hints. A round lasts as long as its busiest worker, and game loads (~0.5-2 s) are
5-20x a step, so small batches per worker scale worse: run `--envs 8` to see it.
Only the number of worker processes hosting the batch changes between configurations. Wall time covers
resets (game loading) and steps; pool start-up (process spawn, imports) is excluded and reported
separately. Each configuration starts fresh worker processes, so the engine caches start cold everywhere.

Two throughputs per configuration: wall (steps / elapsed seconds) and "dedicated cores" (steps / the sum over
rounds of the busiest worker's CPU seconds, from `EnvPool.cpu_stats`): on a shared machine the scheduler's
per-session fair share (autogroup) caps what a session gets however many processes it runs, so the wall
figure cannot scale while other sessions are busy, while the CPU critical path still shows how well the
pool splits the work.

Rows (every figure a ratio against a peer measured in the same run):
- workers = 1, 2, ..., up to the core count, and 2x the core count (oversubscription): steps/s and the
  ratio vs 1 worker (peer: the same pool with 1 worker). Near-linear scaling up to the core count is the
  target; past it the ratio should flatten, not collapse.
- workers = core count with static placement (`EnvPool(balance=False)`: slot i always in worker i % N, no
  preloading): the ratio of the balanced pool vs it.
- machine ceiling: `cores` independent pure-Python processes (allocation-heavy work like an engine's, no
  pool, no IPC) vs 1, interleaved with the pool runs: what this machine gives parallel Python processes
  at all (on a VM whose vCPUs share physical cores or memory bandwidth it is below `cores`x), and the
  pool's scaling as a fraction of it.
- 1 worker with the unmodified engine (`memoize=False`): the ratio of the memoised engine vs it.

    python -m rwml_jax.bench.env_scaling [--data $ALFWORLD_DATA] [--games 64] [--envs 32] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

from rwml_jax.envs.alfworld_data import AlfworldDataError, list_games
from rwml_jax.envs.pool import EnvPool
from rwml_jax.envs.replay import ALFWORLD_FACTORY, REPLAY_MAX_STEPS, replay_games


def _python_work(iterations: int) -> None:
    """Allocation-heavy pure-Python work (dicts, tuples, strings, a sort), like a text engine's."""
    for _ in range(iterations):
        d = {}
        for i in range(2000):
            d[str(i)] = [i, (i, str(i * 3))]
        sorted(d.items(), key=lambda kv: kv[1][1][1])


def _ceiling_proc(barrier: Any, iterations: int) -> None:
    barrier.wait()  # start-up (spawn, imports) is excluded: all processes start working together
    _python_work(iterations)


def run_ceiling(procs: int, iterations: int) -> dict[str, Any]:
    """The machine's own scaling: `procs` independent processes each doing `iterations` of `_python_work`
    at once. Returns the work rate (iterations/s over all processes)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    ps = [ctx.Process(target=_ceiling_proc, args=(barrier, iterations), daemon=True) for _ in range(procs)]
    for p in ps:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    for p in ps:
        p.join()
    seconds = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in ps):
        raise RuntimeError("a ceiling process failed")
    return {"procs": procs, "seconds": seconds, "rate": procs * iterations / seconds}


def run_config(data: str, games: list, envs: int, workers: int, memoize: bool, balance: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    kwargs = {"data_dir": data, "max_steps": REPLAY_MAX_STEPS, "memoize": memoize}
    envs = max(envs, workers)
    with EnvPool(ALFWORLD_FACTORY, num_envs=envs, num_workers=workers, factory_kwargs=kwargs,
                 balance=balance) as pool:
        startup = time.perf_counter() - t0
        report = replay_games(pool, games, games[0].split)
        cpu = pool.cpu_stats()
    if report.wins != len(games):
        raise RuntimeError(f"benchmark replay lost games: {[g.task_id for g in report.games if not g.won]}")
    return {"workers": workers, "envs": envs, "memoize": memoize, "balance": balance, "games": len(games),
            "preloads": pool.preloads, "preload_hits": pool.preload_hits,
            "env_steps": report.env_steps,
            "resets": report.resets, "seconds": report.seconds, "startup_seconds": startup,
            "steps_per_s": report.env_steps / report.seconds, "games_per_s": len(games) / report.seconds,
            "worker_cpu_seconds": cpu["cpu_seconds"], "critical_cpu_seconds": cpu["critical_cpu_seconds"],
            "dedicated_steps_per_s": report.env_steps / cpu["critical_cpu_seconds"]}


def main(argv: list[str] | None = None) -> int:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="ALFWorld data folder: the official layout or a folder holding valid_seen/ "
                        "(default: $ALFWORLD_DATA)")
    p.add_argument("--split", default="valid_seen", help="split to take the games from")
    p.add_argument("--games", type=int, default=64, help="games replayed per configuration (default 64)")
    p.add_argument("--envs", type=int, default=32, help="environments in the rollout batch (default 32)")
    p.add_argument("--workers", type=int, nargs="+", default=sorted({1, cores, 2 * cores}),
                   help=f"worker counts to measure (default 1, cores={cores}, 2*cores)")
    p.add_argument("--no-plain", action="store_true", help="skip the unmodified-engine peer row")
    p.add_argument("--no-static", action="store_true", help="skip the static-placement peer row")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the machine-ceiling peer (independent pure-Python processes, 1 vs cores)")
    p.add_argument("--ceiling-iterations", type=int, default=3000,
                   help="work per ceiling process (default 3000, ~5 s on one core here)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every configuration this many times, interleaved, and report the run with the "
                        "median time (default 1; this machine's speed drifts by 10-20 %% between minutes)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    if 1 not in args.workers:
        args.workers = [1] + args.workers

    try:
        games = list_games(args.data, args.split)
    except AlfworldDataError as e:
        print(f"env_scaling: {e}", file=sys.stderr)
        return 2
    stride = max(1, len(games) // args.games)
    games = games[::stride][: args.games]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# env_scaling: ALFWorld walkthrough replay of {len(games)} {args.split} games per configuration "
          f"({args.repeats} interleaved run{'s' * (args.repeats > 1)} each, median reported), "
          f"batch of {args.envs} envs; "
          f"{cores} cores ({platform.machine()}); load average at start {load:.2f}", flush=True)

    configs = [(w, True) for w in sorted(set(args.workers))] + ([] if args.no_static else [(cores, False)])
    runs: dict[tuple[int, bool], list[dict[str, Any]]] = {c: [] for c in configs}
    ceiling: dict[int, list[dict[str, Any]]] = {1: [], cores: []}
    for rep in range(args.repeats):  # interleaved, so slow and fast minutes hit every configuration
        if not args.no_ceiling and cores > 1:
            for n in (1, cores):
                c = run_ceiling(n, args.ceiling_iterations)
                ceiling[n].append(c)
                print(f"  [{rep + 1}/{args.repeats}] machine ceiling, {n} independent Python process"
                      f"{'es' * (n > 1)}: {c['rate']:.0f} work units/s ({c['seconds']:.1f} s)",
                      file=sys.stderr, flush=True)
        for w, balance in configs:
            r = run_config(args.data, games, args.envs, w, memoize=True, balance=balance)
            runs[(w, balance)].append(r)
            print(f"  [{rep + 1}/{args.repeats}] workers={w}{'' if balance else ' static placement'}: "
                  f"{r['steps_per_s']:.2f} steps/s ({r['env_steps']} steps + {r['resets']} resets in {r['seconds']:.1f} s; "
                  f"start-up {r['startup_seconds']:.1f} s)", file=sys.stderr, flush=True)

    def median_run(rs: list[dict[str, Any]]) -> dict[str, Any]:
        ordered = sorted(rs, key=lambda r: r["seconds"])
        return dict(ordered[(len(ordered) - 1) // 2], seconds_all=[r["seconds"] for r in rs])

    results = [median_run(runs[(w, True)]) for w in sorted(set(args.workers))]
    static = None if args.no_static else median_run(runs[(cores, False)])
    plain = None
    if not args.no_plain:
        plain = run_config(args.data, games, args.envs, 1, memoize=False)
        print(f"  workers=1 unmodified engine: {plain['steps_per_s']:.2f} steps/s ({plain['seconds']:.1f} s)",
              file=sys.stderr, flush=True)

    base = next(r for r in results if r["workers"] == 1)
    print("\n| workload | workers | env steps/s (wall) | ratio vs 1 worker | env steps/s (dedicated cores) "
          "| ratio vs 1 worker |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        note = " (oversubscribed)" if r["workers"] > cores else ""
        print(f"| ALFWorld replay, {len(games)} {args.split} games, {r['envs']} envs | {r['workers']}{note} | "
              f"{r['steps_per_s']:.2f} | {r['steps_per_s'] / base['steps_per_s']:.2f}x | "
              f"{r['dedicated_steps_per_s']:.2f} | "
              f"{r['dedicated_steps_per_s'] / base['dedicated_steps_per_s']:.2f}x |")
    if args.repeats > 1:
        for w in sorted(set(args.workers)) + ([] if args.no_static else ["static"]):
            key = (cores, False) if w == "static" else (w, True)
            if key == (1, True):
                continue
            paired = [a["seconds"] / b["seconds"] for a, b in zip(runs[(1, True)], runs[key])]
            print(f"(workers={w}: the ratio vs 1 worker within each interleaved repeat: "
                  f"{', '.join(f'{x:.2f}x' for x in paired)}; median {sorted(paired)[(len(paired) - 1) // 2]:.2f}x)")
    print("\n(dedicated cores: steps / sum over rounds of the busiest worker's CPU seconds, i.e. the round times the "
          "workers would need with a core each; on a shared machine the kernel's per-session fair share caps the "
          f"wall figure. Load average at the end: {os.getloadavg()[0]:.2f}.)")
    if ceiling[1] and ceiling[cores]:
        med = {n: sorted(c["rate"] for c in cs)[(len(cs) - 1) // 2] for n, cs in ceiling.items()}
        ratio = med[cores] / med[1]
        pool_ratio = next((r["steps_per_s"] / base["steps_per_s"] for r in results if r["workers"] == cores), None)
        print("\n| workload | processes | work/s | ratio vs 1 process |")
        print("|---|---:|---:|---:|")
        print(f"| machine ceiling: independent pure-Python processes, no pool | 1 | {med[1]:.0f} | 1.00x |")
        print(f"| machine ceiling: independent pure-Python processes, no pool | {cores} | {med[cores]:.0f} | "
              f"{ratio:.2f}x |")
        if pool_ratio is not None:
            print(f"\n(the pool's {cores}-worker scaling, {pool_ratio:.2f}x, is {100 * pool_ratio / ratio:.0f} % of what "
                  f"this machine gives {cores} independent processes, {ratio:.2f}x; medians of "
                  f"{len(ceiling[1])} interleaved runs: {[round(c['rate']) for c in ceiling[1]]} vs "
                  f"{[round(c['rate']) for c in ceiling[cores]]})")
    if static is not None:
        bal = next((r for r in results if r["workers"] == cores), None)
        if bal is not None:
            print("\n| workload | placement | env steps/s | ratio vs static |")
            print("|---|---|---:|---:|")
            label = f"ALFWorld replay, {args.envs} envs, {cores} workers"
            print(f"| {label} | static (slot i in worker i % {cores}) | {static['steps_per_s']:.2f} | 1.00x |")
            print(f"| {label} | balanced resets + preloading ({bal['preloads']} preloads, {bal['preload_hits']} used) | "
                  f"{bal['steps_per_s']:.2f} | {bal['steps_per_s'] / static['steps_per_s']:.2f}x |")
    if plain is not None:
        print("\n| workload | engine | env steps/s | ratio vs unmodified engine |")
        print("|---|---|---:|---:|")
        peer = plain["steps_per_s"]
        label = f"ALFWorld replay, {args.envs} envs, 1 worker"
        print(f"| {label} | unmodified textworld/alfworld | {peer:.2f} | 1.00x |")
        print(f"| {label} | memoised (rwml_jax.envs.alfworld_memo) | "
              f"{base['steps_per_s']:.2f} | {base['steps_per_s'] / peer:.2f}x |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"cores": cores, "load_average_start": load, "results": results, "static": static,
                       "plain": plain, "ceiling": ceiling}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
