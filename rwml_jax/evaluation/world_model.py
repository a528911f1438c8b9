"""The world-model side of an evaluation that needs no environment: how far a checkpoint moved from its
start (the paper's forgetting measure: the fraction of parameters changed by more than 1e-3)."""

from __future__ import annotations

import glob
import os

import numpy as np

MOVED_TOL = 1e-3


def _tensors(folder: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder!r}")
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(f))
    return out


def moved_fraction(start: str, end: str, tol: float = MOVED_TOL) -> float:
    """Fraction of the scalar parameters of HF folder `end` with |end - start| > tol (float32 compare).

    Both folders must hold the same tensors (names and shapes); raises ValueError naming the first that
    differs."""
    a, b = _tensors(start), _tensors(end)
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))
        raise ValueError(f"{start!r} and {end!r} hold different tensors, e.g. {diff[:3]}")
    moved = total = 0
    for k, x in a.items():
        y = b[k]
        if x.shape != y.shape:
            raise ValueError(f"tensor {k!r}: shape {x.shape} in {start!r} but {y.shape} in {end!r}")
        moved += int(np.count_nonzero(np.abs(y.astype(np.float32) - x.astype(np.float32)) > tol))
        total += x.size
    return moved / total if total else 0.0
