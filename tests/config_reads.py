"""Which config keys the code reads: `ConfigDict.__getitem__` (attribute access goes through it) is wrapped to
record the dotted key of every read, attributed to the first caller outside ml_collections.

Reads by the config machinery itself (validation, hashing for stage provenance, saving, logging the config)
touch every key and say nothing about what a stage acts on, so callers in `EXCLUDED` modules are ignored.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import ml_collections

from rwml_jax.config.keys import flatten

EXCLUDED = ("rwml_jax.config", "rwml_jax.train.stage_io", "rwml_jax.train.plan", "rwml_jax.train.sweep")


def _prefixes(config: ml_collections.ConfigDict, prefix: str = "") -> dict[int, str]:
    out = {id(config): prefix}
    for k, v in config._fields.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_prefixes(v, f"{prefix}{k}."))
    return out


@contextlib.contextmanager
def record_reads(config: ml_collections.ConfigDict) -> Iterator[set[str]]:
    """Within the block, every leaf of `config` read by code outside `EXCLUDED` is added to the yielded set."""
    where = _prefixes(config)
    reads: set[str] = set()
    original = ml_collections.ConfigDict.__getitem__

    def getitem(self, key):
        value = original(self, key)
        prefix = where.get(id(self))
        if prefix is not None and isinstance(key, str) and not isinstance(value, ml_collections.ConfigDict):
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith("ml_collections"):
                frame = frame.f_back
            caller = frame.f_globals.get("__name__", "") if frame is not None else ""
            if not caller.startswith(EXCLUDED):
                reads.add(prefix + key)
        return value

    ml_collections.ConfigDict.__getitem__ = getitem
    try:
        yield reads
    finally:
        ml_collections.ConfigDict.__getitem__ = original


def unread(config: ml_collections.ConfigDict, reads: set[str]) -> list[str]:
    """The leaves of `config` not in `reads`."""
    return sorted(k for k in flatten(config) if k not in reads)
