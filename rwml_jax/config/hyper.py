"""Sweep points, built the way ml_collections-style ``get_hyper`` files build them (ml_collections itself
ships no such helpers): each helper returns a list of points, a point being ``{dotted config key: value}``.

    from rwml_jax.config import hyper

    hyper.product([hyper.sweep("rwml.learning_rate", [1e-6, 2e-6]),
                   hyper.sweep("rwml.kl_coef", [0.0, 0.01])])            # 4 points: the grid
    hyper.zip([hyper.sweep("rwml.learning_rate", [1e-6, 2e-6]),
               hyper.sweep("rwml.warmup_steps", [0, 10])])              # 2 points: pairs
    hyper.chain([hyper.sweep("seed", [0, 1]), hyper.fixed("rwml.kl_coef", 0.0)])   # 3 points: one after another

Keys may carry the ``config.`` prefix of the command line (``"config.rwml.kl_coef"``); values are Python
values of the field's type (a tuple field takes a tuple, a model field takes ``"Qwen/Qwen3-8B"``), never
command-line text. `product` and `zip` refuse axes that set the same key (a point would silently keep
only one of the values).
"""

from __future__ import annotations

import builtins
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

Point = dict[str, Any]

PREFIX = "config."


def _key(key: str) -> str:
    if not isinstance(key, str) or not key.strip(". "):
        raise ValueError(f"a sweep key must be a dotted config key like 'rwml.learning_rate'; got {key!r}")
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def _values(key: str, values: Iterable[Any]) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"hyper.sweep({key!r}, ...) takes a list of values, got {values!r} "
                         f"(one value: hyper.fixed; a tuple-valued field: a list of tuples)")
    return list(values)


def sweep(key: str, values: Iterable[Any]) -> list[Point]:
    """One point per value: ``[{key: v} for v in values]``."""
    key = _key(key)
    return [{key: v} for v in _values(key, values)]


def fixed(key: str, value: Any, length: int = 1) -> list[Point]:
    """`length` points with the same value (inside `zip`, length must match the other axes)."""
    return [{_key(key): value} for _ in range(length)]


def _merge(parts: Sequence[Point]) -> Point:
    out: Point = {}
    for p in parts:
        clash = sorted(set(out) & set(p))
        if clash:
            raise ValueError(f"two sweep axes set the same key(s) {clash}: combine them in one hyper.sweep")
        out.update(p)
    return out


def product(axes: Sequence[Sequence[Point]]) -> list[Point]:
    """The grid: every combination of one point from each axis (the last axis varies fastest)."""
    return [_merge(combo) for combo in itertools.product(*[list(a) for a in axes])]


def zip(axes: Sequence[Sequence[Point]]) -> list[Point]:  # noqa: A001  (the hyper-file name)
    """Points taken side by side: the i-th point merges the i-th point of every axis (equal lengths)."""
    axes = [list(a) for a in axes]
    lengths = {len(a) for a in axes}
    if len(lengths) > 1:
        raise ValueError(f"hyper.zip needs axes of one length; got lengths {[len(a) for a in axes]}")
    return [_merge(parts) for parts in builtins.zip(*axes)]


def chain(axes: Sequence[Sequence[Point]]) -> list[Point]:
    """The axes' points one after another."""
    return [dict(p) for a in axes for p in a]
