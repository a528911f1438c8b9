"""The sampler's two decode-layout weight orientations against each other, interleaved in one process.

`rwml_jax.models.decode_layout` stores the projection weights either [in, out] ("in_out") or [out, in]
("out_in"), and `default_orientation` picks one per machine from measurements like this one. Workload: the
generation workload of ../shared/bench/workloads.md (batch 16, prompt 128, 128 new tokens, no early stop)
on `tiny` and `small`; figure: generated tokens/s of each orientation (median of `--repeats` calls after a
warm-up, alternating which goes first), the ratio in_out / out_in, and whether both produced the same
tokens (they compute the same products; only float rounding may differ).

    python -m rwml_jax.bench.orientation_bench
    python -m rwml_jax.bench.orientation_bench --shapes small --modes greedy --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from typing import Any

from rwml_jax import hostenv
from rwml_jax.bench.generate_bench import MODES, SHAPES, Ours, shape_config


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax
    import numpy as np

    from rwml_jax.models.decode_layout import ORIENTATIONS, default_orientation

    auto = default_orientation(jax.devices())
    print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__} ({jax.devices()[0].platform}); "
          f"'auto' picks {auto} here", flush=True)
    rows = []
    for shape in args.shapes:
        config = shape_config(shape)
        runs = {o: Ours(config, args.batch, args.prompt_len, args.new_tokens, args.seed, o) for o in ORIENTATIONS}
        for mode in args.modes:
            outs = {}
            for o, ours in runs.items():
                ours(mode)  # compile + warm-up
                outs[o] = ours.sampler.generate(ours.params, ours.prompts, max_new_tokens=args.new_tokens, seed=1,
                                                stop_at_eos=False, **MODES[mode])
            same = bool(np.array_equal(outs["out_in"].tokens, outs["in_out"].tokens))
            times: dict[str, list[float]] = {o: [] for o in ORIENTATIONS}
            for r in range(args.repeats):
                for o in (ORIENTATIONS if r % 2 == 0 else ORIENTATIONS[::-1]):
                    times[o].append(runs[o](mode))
            tokens = args.batch * args.new_tokens
            tps = {o: tokens / statistics.median(ts) for o, ts in times.items()}
            row = dict(shape=shape, mode=mode, tok_s=tps, runs_s=times, ratio=tps["in_out"] / tps["out_in"],
                       same_tokens=same, auto=auto)
            rows.append(row)
            print(f"{shape:>6} {mode:>6}: in_out {tps['in_out']:8.1f} tok/s, out_in {tps['out_in']:8.1f} tok/s, "
                  f"ratio {row['ratio']:.2f}x (runs in_out {[round(x, 3) for x in times['in_out']]}, "
                  f"out_in {[round(x, 3) for x in times['out_in']]}); same tokens: {same}", flush=True)
        del runs
    return rows


def main(argv: list[str] | None = None) -> int:
    hostenv.reexec_with_malloc_tunables(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "small"])
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["greedy", "sample"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=6, help="timed calls per orientation (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None, help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    rows = run(args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
