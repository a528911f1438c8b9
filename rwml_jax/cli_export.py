"""`rwml-jax export`: a run's model as a Hugging Face folder (transformers / vLLM load it), optionally pushed.

    rwml-jax export runs/demo_cpu rwml out/rwml-demo --dtype bfloat16
    rwml-jax export runs/demo_cpu rwml@40 out/rwml-step40          # one checkpoint step
    rwml-jax export rwml_alfworld rwml out/rwml --config.work_dir=runs/x --push-to-hub me/rwml-alfworld --private

RUN: a run folder (the recipe's work_dir), or a recipe name whose work_dir (after --config.KEY=VALUE
overrides) is the run folder. STAGE: warmstart | rwml | wm_sft | filter (its SFT'd filter model), or
STAGE@STEP for that stage's orbax checkpoint of optimiser step STEP.
"""

from __future__ import annotations

import argparse
import os
import sys

from rwml_jax import storage
from rwml_jax.config import ConfigError, load_config
from rwml_jax.train.export import EXPORT_DTYPES, ExportError, export_model, push_to_hub


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a run's model as a Hugging Face folder (and push it to the hub)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run folder, or a recipe name (its work_dir; --config.KEY=VALUE apply)")
    p.add_argument("stage", metavar="STAGE", help="warmstart | rwml | wm_sft | filter, or STAGE@STEP (a checkpoint)")
    p.add_argument("out", metavar="OUT", help="new folder for the Hugging Face files")
    p.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES, help="weight dtype (default float32)")
    p.add_argument("--max-shard-gb", type=float, default=4.0,
                   help="split the safetensors into shards of at most this many GB (default 4)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload the folder to this hub repo")
    p.add_argument("--private", action="store_true", help="create the hub repo private (with --push-to-hub)")
    p.set_defaults(func=run, accepts_config_overrides=True)


def work_dir_of(run_arg: str, overrides: list[str]) -> str:
    """The run folder RUN names: the folder itself, or the work_dir of the recipe RUN (with overrides)."""
    if os.path.isdir(run_arg) or storage.is_remote(run_arg):  # a bucket URL names a run folder
        if overrides:
            raise ExportError(f"--config overrides ({' '.join(overrides)}) apply to a recipe name, but {run_arg!r} "
                              "is a run folder")
        return run_arg

    try:
        config = load_config(run_arg, overrides)
    except ConfigError as e:
        raise ExportError(f"RUN {run_arg!r} is neither a run folder nor a recipe: {e}") from e
    if not storage.as_path(config.work_dir, "work_dir").is_dir():
        raise ExportError(f"recipe {run_arg!r} runs in {config.work_dir}, which does not exist (run it first, or "
                          "pass the run folder)")
    return config.work_dir


def run(args: argparse.Namespace) -> int:
    if args.private and not args.push_to_hub:
        print("rwml-jax export: --private needs --push-to-hub REPO", file=sys.stderr)
        return 2
    try:
        work_dir = work_dir_of(args.run, list(args.config_overrides))
        out = export_model(work_dir, args.stage, args.out, dtype=args.dtype,
                           max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
        print(f"exported {args.stage} of {work_dir} ({args.dtype}) to {out}")
        if args.push_to_hub:
            print(f"uploaded to {push_to_hub(out, args.push_to_hub, private=args.private)}")
    except ExportError as e:
        print(f"rwml-jax export: {e}", file=sys.stderr)
        return 2
    return 0
