"""PNG plots for the end of a stage (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rwml_jax.train.stage_io import atomic_open

Curve = Sequence[tuple[float, float]] | Sequence[tuple[float, float, float]] | tuple[Sequence[float], Sequence[float]]


def _points(curve: Any) -> tuple[list[float], list[float], list[float] | None]:
    """(x, y, std or None) from [(x, y)], [(x, y, std)] or (xs, ys)."""
    if isinstance(curve, tuple) and len(curve) == 2 and all(isinstance(c, (list, tuple)) for c in curve) \
            and (not curve[0] or not isinstance(curve[0][0], (list, tuple))):
        xs, ys = list(curve[0]), list(curve[1])
        if len(xs) != len(ys):
            raise ValueError(f"curve has {len(xs)} x values but {len(ys)} y values")
        return [float(x) for x in xs], [float(y) for y in ys], None
    pts = sorted(curve, key=lambda p: p[0])
    xs = [float(p[0]) for p in pts]
    ys = [float(p[1]) for p in pts]
    std = [float(p[2]) for p in pts] if pts and len(pts[0]) > 2 else None
    return xs, ys, std


def plot_reward_curve(
    path: str | os.PathLike,
    curves: Mapping[str, Curve],
    *,
    baselines: Mapping[str, float] | None = None,
    title: str = "Held-out world-model reward",
    xlabel: str = "optimiser step",
    ylabel: str = "mean world-model reward (validation triplets)",
    ylim: tuple[float, float] | None = (0.0, 1.0),
) -> Path:
    """Line plot of held-out reward against training step; written atomically to `path` (PNG).

    curves: {series name: points}, e.g. {"rwml": [(0, 0.21), (10, 0.27), ...], "wm_sft": ...}; a point may carry
      a std as a third value (drawn as a band).
    baselines: {name: value} drawn as dashed horizontal lines (e.g. {"warm start": 0.21, "base model": 0.18}).
    ylim: y range (None = automatic); rewards are in [0, 1].
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not curves and not baselines:
        raise ValueError("nothing to plot: no curves and no baselines")
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    try:
        for name, curve in curves.items():
            xs, ys, std = _points(curve)
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.8, label=name)
            if std is not None:
                lo = [y - s for y, s in zip(ys, std)]
                hi = [y + s for y, s in zip(ys, std)]
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        styles = ["--", ":", "-."]
        for i, (name, value) in enumerate((baselines or {}).items()):
            ax.axhline(float(value), linestyle=styles[i % len(styles)], color=f"C{len(curves) + i}",
                       linewidth=1.3, label=f"{name} ({float(value):.3f})")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        return save_png(fig, path)
    finally:
        plt.close(fig)


def save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out a matplotlib figure and write it to `path` as PNG, atomically."""
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path
