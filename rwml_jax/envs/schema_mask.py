"""Mask JSON tool responses to their OpenAPI-style schema: types, not values.

RWML's τ² world-model data (paper §Stage 0) replaces each JSON tool response by its schema, e.g.
``{"user_id": "sara_doe_496", "age": 31}`` -> ``{"type": "object", "properties": {"user_id": {"type":
"string"}, "age": {"type": "integer"}}}``, so the world model learns to predict the *structure* of a
response rather than database contents it cannot know.

Rules (deterministic; the output string is a function of the structure only):

* object -> ``{"type": "object", "properties": {key: schema}}`` in the key order of the data.
  An object whose keys are themselves data is a map, ``{"type": "object", "additionalProperties": merged
  schema of the values}``, so ids and names do not leak through property names. A key is data-like when
  it contains a digit, whitespace or one of ``-#:./`` (ids ``"credit_card_4421486"``, ``"1008292230"``,
  dates ``"2024-05-16"``, names ``"Action Camera"``); an object is a map when all its keys are data-like,
  or when it has ≥ 4 keys, at least half data-like, and values of one JSON type (retail's
  ``list_all_product_types``). Records such as ``{"address1": …, "address2": …, "city": …}`` stay records.
* array -> ``{"type": "array", "items": merged schema of all elements}`` (``{}`` for an empty array).
  Merging: objects merge their properties recursively; integer + number -> number; a type mixed with
  null gets ``"nullable": true`` (OpenAPI 3.0); two or more other types -> ``{"anyOf": [...]}``.
* string / integer / number / boolean / null -> ``{"type": ...}``.
* Text that is not a JSON object or array (τ²'s ``"Error: ..."`` strings, ``"Transfer successful"``,
  telecom's plain-text device readouts, a bare number) is returned unchanged, because it is not a database
  record and its wording is what the world model must predict.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A key that holds data rather than naming a field: it has a digit, whitespace or an id/date separator.
_DATA_KEY_RE = re.compile(r"[0-9\s\-#:./]")


def _is_map(obj: dict[str, Any]) -> bool:
    """Whether an object is a map keyed by data (ids, dates, names) rather than a record with fields."""
    keys = list(obj)
    if not keys:
        return False
    n_data = sum(bool(_DATA_KEY_RE.search(k)) for k in keys)
    if n_data == len(keys):
        return True
    same_type = len({_type_name(v) for v in obj.values()}) == 1
    return len(keys) >= 4 and 2 * n_data >= len(keys) and same_type


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def json_schema(value: Any) -> dict[str, Any]:
    """The OpenAPI-style schema of a parsed JSON value (see module docstring)."""
    t = _type_name(value)
    if t == "object":
        if _is_map(value):
            return {"type": "object", "additionalProperties": merge_schemas([json_schema(v) for v in value.values()])}
        return {"type": "object", "properties": {k: json_schema(v) for k, v in value.items()}}
    if t == "array":
        return {"type": "array", "items": merge_schemas([json_schema(v) for v in value])}
    return {"type": t}


def _merge_same(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge two schemas of the same non-null type."""
    t = a["type"]
    if t == "object":
        if "additionalProperties" in a or "additionalProperties" in b:
            vals = [s.get("additionalProperties", {}) for s in (a, b)]
            vals += list(a.get("properties", {}).values()) + list(b.get("properties", {}).values())
            return {"type": "object", "additionalProperties": merge_schemas([v for v in vals if v])}
        props = dict(a["properties"])
        for k, v in b["properties"].items():
            props[k] = merge_schemas([props[k], v]) if k in props else v
        return {"type": "object", "properties": props}
    if t == "array":
        items = [s for s in (a["items"], b["items"]) if s]
        return {"type": "array", "items": merge_schemas(items)}
    return {"type": t}


def merge_schemas(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    """One schema covering all of ``schemas`` (array items). ``[]`` -> ``{}`` (anything)."""
    if not schemas:
        return {}
    nullable = False
    by_type: dict[str, dict[str, Any]] = {}
    for s in schemas:
        if s.get("nullable"):
            nullable = True
        for part in s.get("anyOf", [s]):
            if not part:  # {} = unknown (items of an empty array): adds nothing
                continue
            if part.get("nullable"):
                nullable = True
                part = {k: v for k, v in part.items() if k != "nullable"}
            t = part["type"]
            if t == "null":
                nullable = True
                continue
            by_type[t] = _merge_same(by_type[t], part) if t in by_type else part
    if "integer" in by_type and "number" in by_type:
        del by_type["integer"]
    if not by_type:
        return {"type": "null"} if nullable else {}
    parts = list(by_type.values())
    out = parts[0] if len(parts) == 1 else {"anyOf": parts}
    if nullable:
        out = {**out, "nullable": True}
    return out


def mask_to_schema(text_or_obj: Any) -> str:
    """A tool response (JSON text or an already-parsed value) -> its schema as a JSON string.

    Non-JSON text and JSON scalars are returned unchanged (as text); dicts and lists are masked.
    """
    if isinstance(text_or_obj, str):
        stripped = text_or_obj.strip()
        if not stripped or stripped[0] not in "{[":
            return text_or_obj
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return text_or_obj
    else:
        value = text_or_obj
        if not isinstance(value, (dict, list, tuple)):
            return value if isinstance(value, str) else json.dumps(value)
    return json.dumps(json_schema(value))
