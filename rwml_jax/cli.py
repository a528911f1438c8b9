"""The `rwml-jax` console entry point.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``; that function
registers the subcommand's options and sets ``func`` (called with the parsed ``argparse.Namespace``,
returning an exit code). Modules are imported lazily so ``rwml-jax --help`` stays fast and a
subcommand's heavy dependencies (alfworld, tau2) load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rwml_jax.platform import reexec_with_malloc_tunables

# (subcommand module, one-line help). Order is the order `--help` lists them in.
SUBCOMMANDS: list[str] = [
    "rwml_jax.cli_run",
    "rwml_jax.cli_generate",
    "rwml_jax.envs.cli",
    "rwml_jax.cli_eval",
    "rwml_jax.cli_export",
    "rwml_jax.cli_sweep",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwml-jax",
        description="Reinforcement World Model Learning (RWML) for LLM agents, in JAX/Flax.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:  # a subcommand whose optional deps are missing
            if e.name and e.name.startswith("rwml_jax"):
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    reexec_with_malloc_tunables(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and not getattr(args, "accepts_config_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.config_overrides = extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
