"""Provenance of a loaded config: its JSON form, the file written next to every run, and stable hashes of
the values a stage depends on."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rwml_jax import storage
from rwml_jax.config.keys import ConfigDict, flatten, unknown_key_error


def _jsonable(v: Any) -> Any:
    if isinstance(v, ConfigDict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


def config_to_dict(config: ConfigDict) -> dict[str, Any]:
    """A JSON-ready nested dict (tuples become lists)."""
    return _jsonable(config)


def save_config(config: ConfigDict, path: str | os.PathLike) -> Path:
    """Write ``config.json`` (JSON) and, next to it, ``config.py.txt`` (the ConfigDict's repr) atomically.

    Returns the JSON path. The repr keeps types JSON loses (tuples vs lists) for provenance.
    """
    path = storage.as_path(path)
    if path.suffix != ".json":
        path = path / "config.json"
    if not storage.is_writer():  # one process writes shared files
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")
    _atomic_write(path.with_suffix(".py.txt"), repr(config) + "\n")
    return path


def _atomic_write(path: Path, text: str) -> None:
    if storage.is_remote(path):  # a bucket: one object write is atomic
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def select(config: ConfigDict, keys: Iterable[str], ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The flat {dotted key: value} of the parts of `config` under `keys` (sections or leaves), minus
    anything under `ignore`; tuples become lists (JSON-stable)."""
    flat = flatten(config)
    keys, ignore = list(keys), list(ignore)

    def under(k: str, prefixes: list[str]) -> bool:
        return any(k == p or k.startswith(p + ".") for p in prefixes)

    for k in keys:
        if k not in flat and not any(f.startswith(k + ".") for f in flat):
            raise unknown_key_error(k, config)
    return {k: _jsonable(v) for k, v in sorted(flat.items()) if under(k, keys) and not under(k, ignore)}


def config_hash(values: Mapping[str, Any]) -> str:
    """sha256 (hex, 16 chars) of a flat {key: value} dict, stable across runs and Python versions."""
    blob = json.dumps(_jsonable(dict(values)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
