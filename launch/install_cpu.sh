#!/usr/bin/env bash
# Installs rwml-jax and everything its demo and tests need on a CPU machine (Python 3.11+).
# torch==2.13.0 goes first: it is only the numerical reference in tests and benchmarks, and a plain
# `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[dev,envs,embed]" "torch==2.13.0"
python3 - <<'PY'
import importlib
for mod in ("jax", "flax", "optax", "orbax.checkpoint", "transformers", "sentence_transformers", "alfworld", "tau2", "torch"):
    importlib.import_module(mod)
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__}: expected the 2.13.0 CPU build"
print("rwml-jax: install OK")
PY
