"""The sampler's decode-layout weight formats against each other, interleaved in one process.

`rwml_jax.models.decode_layout` stores the projection weights [in, out] ("in_out"), [out, in] ("out_in"),
or [out, in] multiplied as an element-wise product summed over `in` ("out_in_reduce"), and
`default_orientation` picks one per machine and model size from measurements like this one. Workload: the
generation workload of docs/benchmarks.md (batch 16, prompt 128, 128 new tokens, no early stop)
on `tiny` and `small`; figure: generated tokens/s of each format (median of `--repeats` calls after a
warm-up, rotating which goes first), each one's ratio to "out_in" and to the format "auto" picks, and
whether all produced the same tokens (they compute the same products; only float rounding may differ).

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

    from rwml_jax.models.decode_layout import default_orientation

    print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__} ({jax.devices()[0].platform})",
          flush=True)
    rows = []
    for shape in args.shapes:
        config = shape_config(shape)
        auto = default_orientation(jax.devices(), config)
        formats = tuple(args.formats)
        runs = {o: Ours(config, args.batch, args.prompt_len, args.new_tokens, args.seed, o) for o in formats}
        for mode in args.modes:
            outs = {}
            for o, ours in runs.items():
                ours(mode)  # compile + warm-up
                outs[o] = ours.sampler.generate(ours.params, ours.prompts, max_new_tokens=args.new_tokens, seed=1,
                                                stop_at_eos=False, **MODES[mode])
            first = outs[formats[0]]
            same = all(bool(np.array_equal(first.tokens, o.tokens)) for o in outs.values())
            times: dict[str, list[float]] = {o: [] for o in formats}
            for r in range(args.repeats):
                k = r % len(formats)
                for o in formats[k:] + formats[:k]:
                    times[o].append(runs[o](mode))
            tokens = args.batch * args.new_tokens
            tps = {o: tokens / statistics.median(ts) for o, ts in times.items()}
            base = "out_in" if "out_in" in tps else formats[0]
            row = dict(shape=shape, mode=mode, tok_s=tps, runs_s=times, auto=auto, same_tokens=same,
                       ratio_to_out_in={o: t / tps[base] for o, t in tps.items()},
                       ratio_to_auto={o: t / tps[auto] for o, t in tps.items()} if auto in tps else None)
            rows.append(row)
            cells = ", ".join(f"{o} {t:8.1f} tok/s ({t / tps[base]:.2f}x)" for o, t in tps.items())
            print(f"{shape:>6} {mode:>6}: {cells}  [ratios to {base}; auto picks {auto}]; same tokens: {same}; "
                  f"runs {{{', '.join(f'{o}: {[round(x, 3) for x in ts]}' for o, ts in times.items())}}}", flush=True)
        del runs
    return rows


def main(argv: list[str] | None = None) -> int:
    hostenv.reexec_with_malloc_tunables(argv)
    from rwml_jax.models.decode_layout import ORIENTATIONS  # imports JAX: after the re-exec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "small"])
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["greedy", "sample"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=6, help="timed calls per format (default 6)")
    p.add_argument("--formats", nargs="+", choices=ORIENTATIONS, default=list(ORIENTATIONS),
                   help="weight formats to compare (default all)")
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
