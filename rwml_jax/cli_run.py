"""`rwml-jax run | demo | plan | <stage>`: run recipes from config files.

    rwml-jax run rwml_alfworld --config.model.path=/models/qwen2.5-7b --config.mesh.fsdp=8
    rwml-jax run configs/rwml_tau2.py --dry-run
    rwml-jax rwml demo_cpu --config.rwml.max_steps=20        # one stage (its inputs must exist)
    rwml-jax demo                                            # the embedded CPU demo (README)

Config overrides use ml_collections' syntax (`--config.section.key=value`); unknown or mistyped keys
fail before any work starts, naming the closest valid key. A killed run continues when the same command
is run again: finished stages are reused, the interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from rwml_jax import storage
from rwml_jax.config import STAGE_ORDER, ConfigError, load_config
from rwml_jax.evaluation.metrics import pct
from rwml_jax.train.plan import compiled_update_memory_lines, describe_plan
from rwml_jax.train.run import run_stages

DEMO_RECIPE = "demo_cpu"


def _add_common(p: argparse.ArgumentParser, *, recipe: bool = True) -> None:
    if recipe:
        p.add_argument("config", help="recipe: a name in configs/ (demo_cpu, rwml_alfworld, rwml_tau2), "
                                      "a path to a config .py file, optionally ':variant' (demo_cpu:smoke)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="recompute STAGE even if its output exists (repeatable; 'all' = every stage)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (stages, data sizes, steps, mesh, memory) and exit without running")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (the default whenever the work dir holds one; kept for clarity)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.epilog = "Any --config.KEY=VALUE arguments override fields of the recipe."
    p.set_defaults(accepts_config_overrides=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run every stage of a recipe (reusing finished stages)",
                       description="Run the stages listed in the recipe's `stages` field, in order.")
    _add_common(p)
    p.add_argument("--stages", default="", help="comma-separated subset of stages to run instead of config.stages")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="the embedded CPU demo: warm start, collect, triplets, filter, rwml, eval",
                       description="Runs configs/demo_cpu.py end to end offline and prints the held-out "
                                   "world-model reward before and after RWML.")
    _add_common(p, recipe=False)
    p.add_argument("--variant", default="default", choices=["default", "smoke"],
                   help="'smoke' is a ~2.2-minute version with tiny numbers")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("plan", help="print a recipe's plan (same as run --dry-run)")
    _add_common(p)
    p.add_argument("--memory", action="store_true",
                   help="also compile the rwml update for the recipe's shapes on this machine's devices under each "
                        "remat policy and print XLA's memory per device")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="GiB per device to choose the remat policy for (default: the device's own memory)")
    p.add_argument("--devices", type=int, default=None, help="plan the mesh and memory for N devices (default: "
                   "the devices visible here)")
    p.set_defaults(func=lambda a: _cmd_run(a, dry=True))

    for stage in STAGE_ORDER:
        if stage == "eval":  # `rwml-jax eval RECIPE` and the standalone `rwml-jax eval --env ...`: cli_eval
            continue
        p = sub.add_parser(stage.replace("_", "-"), help=f"run only the '{stage}' stage of a recipe")
        _add_common(p)
        p.set_defaults(func=lambda a, s=stage: _cmd_run(a, only=(s,)))


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "urllib3", "httpx", "LiteLLM"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(args: argparse.Namespace, recipe: str):
    try:
        return load_config(recipe, args.config_overrides)
    except ConfigError as e:
        print(f"rwml-jax: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _cmd_run(args: argparse.Namespace, *, only: tuple[str, ...] | None = None, dry: bool = False,
             recipe: str | None = None) -> int:
    _setup_logging(args.verbose)
    config = _load(args, recipe or args.config)
    stages = only or (tuple(s for s in args.stages.split(",") if s) if getattr(args, "stages", "") else None)
    if dry or args.dry_run:

        print(describe_plan(config, getattr(args, "devices", None)))
        if getattr(args, "memory", False):
            print("\n".join(compiled_update_memory_lines(config, args.memory_budget)))
        return 0
    force = tuple(STAGE_ORDER if "all" in args.force else args.force)

    summaries = run_stages(config, stages, force=force)
    _print_summary(config, summaries)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    recipe = DEMO_RECIPE if args.variant == "default" else f"{DEMO_RECIPE}:{args.variant}"
    rc = _cmd_run(args, recipe=recipe)
    print(f"\nDemo finished in {(time.time() - t0) / 60:.1f} min.")
    return rc


def _print_summary(config: Any, summaries: dict[str, Any]) -> None:
    if not storage.is_writer():  # one process prints the summary
        return
    work = storage.as_path(config.work_dir)
    print("\n" + "=" * 78)
    print(f"{config.name}: stages {', '.join(summaries)} done; outputs in {work}/")
    if "warmstart" in summaries:
        w = summaries["warmstart"]
        print(f"  warm start: {w.get('params', 0) / 1e6:.2f}M-parameter model trained from scratch on "
              f"{w.get('policy_turns')} policy + {w.get('world_model_turns')} world-model turns of "
              f"{w.get('games')} generated games played by the {w.get('corpus', 'walkthrough')} "
              f"({w.get('walkthrough_wins')} won)")
    if "collect" in summaries:
        s = summaries["collect"]
        print(f"  collect:    {s.get('episodes')} episodes, success {s.get('success_rate', 0):.2f}, "
              f"invalid actions {s.get('invalid_rate', 0):.2f}")
    if "triplets" in summaries:
        s = summaries["triplets"]
        print(f"  triplets:   {s.get('train')} train / {s.get('val')} validation")
    if "filter" in summaries:
        s = summaries["filter"]
        print(f"  filter:     kept {s.get('kept')} of {s.get('total')} train triplets "
              f"(easy {s.get('frac_easy', 0):.2f})")
    for name in ("rwml", "wm_sft"):
        if name in summaries:
            s = summaries[name]
            print(f"  {name:10s}  held-out world-model reward: before {s['reward_before']:.3f} -> after "
                  f"{s['reward_after']:.3f}  ({s['steps']} steps, {s.get('eval_triplets', '')} validation triplets)")
            for kind, v in (s.get("by_action") or {}).items():
                if v.get("n"):
                    print(f"  {'':10s}    on {v['n']} {kind.replace('_', ' ')}s: before {v['before']:.3f} -> "
                          f"after {v['after']:.3f}")
    if "expert_sft" in summaries:
        s = summaries["expert_sft"]
        print(f"  expert_sft: {s.get('examples')} expert turns of {s.get('successes')} / {s.get('tasks')} training tasks; "
              f"loss {s.get('first_loss') or float('nan'):.3f} -> {s.get('final_loss', float('nan')):.3f}")
    if "eval" in summaries:

        for model, s in summaries["eval"].get("models", {}).items():
            for name, v in s.items():
                if isinstance(v, dict) and "success_mean" in v:
                    extra = "".join(f", pass^{k} {pct(x)}" for k, x in (v.get("pass_hat_k") or {}).items())
                    print(f"  eval {model:9s} on {name:12s}: success {pct(v['success_mean'], v['success_std'])} %"
                          f"{extra}, invalid actions {pct(v['invalid_action_rate'])} % ({v['episodes']} episodes)")
            wm = s.get("world_model") or {}
            if "moved_fraction" in wm:
                print(f"  eval {model:9s} world model: {100 * wm['moved_fraction']:.1f} % of parameters moved > 1e-3 "
                      "from the start" + (f"; held-out reward {wm['heldout_reward']:.3f}" if "heldout_reward" in wm else ""))
        print("\n  agent success (%), as `rwml-jax compare` prints it:")
        print("\n".join("  " + line for line in summaries["eval"].get("compare", "").splitlines()))
    if "rwml" in summaries:
        print(f"\n  plot:        {work / 'rwml' / 'reward_curve.png'}")
        print(f"  tensorboard: tensorboard --logdir {work}")
    if config.name.startswith("demo"):
        print("\nThe real recipe on a GPU / TPU host with a hub model:\n"
              "  rwml-jax run rwml_alfworld --config.env.data_dir=$ALFWORLD_DATA \\\n"
              "      --config.model.path=Qwen/Qwen2.5-7B-Instruct --config.embedder.path=Qwen/Qwen3-Embedding-8B\n"
              "  (add --dry-run to see the plan first; multi-host: see launch/README.md)")
    print("=" * 78)
