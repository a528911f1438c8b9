"""Dotted config keys ("rwml.learning_rate"): the error type, flat views, lookups with "did you mean" hints."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
    """A recipe could not be found, or a key or value in it (or in an override) is invalid."""


def flatten(config: ConfigDict | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"rwml.learning_rate": 1e-6, ...}: every leaf under its dotted key (sections are not leaves)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, (ConfigDict, Mapping)):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def suggest_key(key: str, valid: Iterable[str]) -> str | None:
    """The valid dotted key closest to `key`: the same field in another section (a mistyped or moved
    section), else difflib over full keys, then over last components."""
    valid = list(valid)
    last = key.rsplit(".", 1)[-1]
    same_field = [v for v in valid if v.rsplit(".", 1)[-1] == last]
    if same_field:
        return difflib.get_close_matches(key, same_field, n=1, cutoff=0.0)[0]
    hit = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if hit:
        return hit[0]
    by_last: dict[str, list[str]] = {}
    for v in valid:
        by_last.setdefault(v.rsplit(".", 1)[-1], []).append(v)
    hit = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.7)
    return by_last[hit[0]][0] if hit else None


def unknown_key_error(key: str, config: ConfigDict) -> ConfigError:
    """"unknown config key 'k'; did you mean 'k2'?" (or the keys of its section when nothing is close)."""
    valid = list(flatten(config))
    hint = suggest_key(key, valid)
    msg = f"unknown config key {key!r}"
    if hint:
        msg += f"; did you mean {hint!r}?"
    else:
        section = key.split(".")[0]
        same = [v for v in valid if v.startswith(section + ".")]
        if same:
            msg += f" (keys under {section!r}: {', '.join(same)})"
    return ConfigError(msg)


def has_path(config: ConfigDict, key: str) -> bool:
    """Whether the dotted `key` names a section or a leaf of `config`."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def get_path(config: ConfigDict, key: str) -> Any:
    """The section or value at the dotted `key`; ConfigError naming the closest valid key if absent."""
    if not has_path(config, key):
        raise unknown_key_error(key, config)
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node
