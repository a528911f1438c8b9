"""Schema masking on REAL τ² tool responses: tools called on the real airline/retail/telecom databases."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rwml_jax.envs.schema_mask import json_schema, mask_to_schema, merge_schemas


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    """Whether ``value`` fits ``schema`` (the subset mask_to_schema emits)."""
    if not schema:
        return True
    if value is None:
        return bool(schema.get("nullable")) or schema.get("type") == "null"
    if "anyOf" in schema:
        return any(conforms(value, s) for s in schema["anyOf"])
    t = schema["type"]
    if t == "object":
        if not isinstance(value, dict):
            return False
        if "additionalProperties" in schema:
            return all(conforms(v, schema["additionalProperties"]) for v in value.values())
        return set(value) <= set(schema["properties"]) and all(
            conforms(v, schema["properties"][k]) for k, v in value.items()
        )
    if t == "array":
        return isinstance(value, list) and all(conforms(v, schema["items"]) for v in value)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return t == "string" and isinstance(value, str)


def leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in leaves(v)]
    return [value]


@pytest.fixture(scope="module")
def responses() -> dict[str, str]:
    """Real tool responses (τ²'s `Environment.get_response`, the text the agent sees)."""
    pytest.importorskip("tau2")
    from tau2.data_model.message import ToolCall
    from tau2.registry import registry

    import rwml_jax.envs.tau2_env  # noqa: F401  (quiet tau2 logging, cost map env)

    out: dict[str, str] = {}

    def call(env, key, name, args, requestor="assistant"):
        out[key] = env.get_response(ToolCall(id="t", name=name, arguments=args, requestor=requestor)).content

    retail = registry.get_env_constructor("retail")()
    uid = next(iter(retail.tools.db.users))
    user = retail.tools.db.users[uid]
    order_id = user.orders[0]
    product_id = retail.tools.db.orders[order_id].items[0].product_id
    call(retail, "retail.get_user_details", "get_user_details", {"user_id": uid})
    call(retail, "retail.get_order_details", "get_order_details", {"order_id": order_id})
    call(retail, "retail.get_product_details", "get_product_details", {"product_id": product_id})
    call(retail, "retail.list_all_product_types", "list_all_product_types", {})
    call(retail, "retail.error", "get_user_details", {"user_id": "nobody_0"})

    airline = registry.get_env_constructor("airline")()
    auid = next(iter(airline.tools.db.users))
    res_id = airline.tools.db.users[auid].reservations[0]
    reservation = airline.tools.db.reservations[res_id]
    call(airline, "airline.get_user_details", "get_user_details", {"user_id": auid})
    call(airline, "airline.get_reservation_details", "get_reservation_details", {"reservation_id": res_id})
    call(
        airline,
        "airline.search_direct_flight",
        "search_direct_flight",
        {"origin": "JFK", "destination": "SEA", "date": reservation.flights[0].date},
    )
    call(airline, "airline.list_all_airports", "list_all_airports", {})
    call(airline, "airline.calculate", "calculate", {"expression": "(483 + 1991) * 0.5"})
    call(airline, "airline.transfer", "transfer_to_human_agents", {"summary": "user wants a human"})

    telecom = registry.get_env_constructor("telecom")()
    call(telecom, "telecom.get_customer_by_phone", "get_customer_by_phone", {"phone_number": "555-123-2002"})
    call(telecom, "telecom.get_bills_for_customer", "get_bills_for_customer", {"customer_id": "C1001"})
    call(telecom, "telecom.get_details_by_id", "get_details_by_id", {"id": "L1002"})
    return out


JSON_KEYS = [
    "retail.get_user_details",
    "retail.get_order_details",
    "retail.get_product_details",
    "retail.list_all_product_types",
    "airline.get_user_details",
    "airline.get_reservation_details",
    "airline.search_direct_flight",
    "airline.list_all_airports",
    "telecom.get_customer_by_phone",
    "telecom.get_bills_for_customer",
    "telecom.get_details_by_id",
]


@pytest.mark.parametrize("key", JSON_KEYS)
def test_real_responses_mask_to_a_schema_they_conform_to_without_values(responses, key):
    raw = responses[key]
    value = json.loads(raw)
    masked = mask_to_schema(raw)
    schema = json.loads(masked)
    assert conforms(value, schema), key
    assert mask_to_schema(value) == masked  # parsed input gives the same text
    # no database value survives: no string value of the response appears in the mask
    # (masks only contain schema words), and no property name is an id
    for leaf in leaves(value):
        if (
            isinstance(leaf, str)
            and len(leaf) >= 3
            and leaf not in ("string", "object", "array", "integer", "number", "boolean")
        ):
            assert json.dumps(leaf) not in masked, (key, leaf)


def test_retail_records_and_maps(responses):
    user = json.loads(mask_to_schema(responses["retail.get_user_details"]))
    props = user["properties"]
    assert user["type"] == "object" and props["user_id"] == {"type": "string"}
    assert props["name"] == {
        "type": "object",
        "properties": {"first_name": {"type": "string"}, "last_name": {"type": "string"}},
    }
    assert "address1" in props["address"]["properties"]  # a record stays a record
    assert props["orders"] == {"type": "array", "items": {"type": "string"}}
    # payment methods are keyed by their ids: a map, the ids do not leak
    assert "additionalProperties" in props["payment_methods"]
    payment_ids = json.loads(responses["retail.get_user_details"])["payment_methods"].keys()
    assert not any(pid in mask_to_schema(responses["retail.get_user_details"]) for pid in payment_ids)

    product = json.loads(mask_to_schema(responses["retail.get_product_details"]))
    variant = product["properties"]["variants"]["additionalProperties"]
    assert variant["properties"]["price"] == {"type": "number"} and variant["properties"]["available"] == {
        "type": "boolean"
    }
    types = json.loads(mask_to_schema(responses["retail.list_all_product_types"]))
    assert types == {"type": "object", "additionalProperties": {"type": "string"}}

    order = json.loads(mask_to_schema(responses["retail.get_order_details"]))
    item = order["properties"]["items"]["items"]
    assert item["type"] == "object" and item["properties"]["price"] == {"type": "number"}


def test_airline_and_telecom_shapes(responses):
    res = json.loads(mask_to_schema(responses["airline.get_reservation_details"]))
    flight = res["properties"]["flights"]["items"]["properties"]
    assert flight["price"] == {"type": "integer"} and flight["date"] == {"type": "string"}
    pm = json.loads(mask_to_schema(responses["airline.get_user_details"]))["properties"]["payment_methods"]
    # credit cards, certificates, gift cards merge into one schema of all their fields
    assert {"source", "id"} <= set(pm["additionalProperties"]["properties"])
    cust = json.loads(mask_to_schema(responses["telecom.get_customer_by_phone"]))["properties"]
    assert cust["last_extension_date"] == {"type": "null"}
    assert cust["line_ids"] == {"type": "array", "items": {"type": "string"}}
    bills = json.loads(mask_to_schema(responses["telecom.get_bills_for_customer"]))
    assert bills["type"] == "array" and bills["items"]["properties"]["total_due"] == {"type": "number"}
    # an empty draft bill's line_items and full bills' line_items merge into one item schema
    assert bills["items"]["properties"]["line_items"]["items"]["properties"]["amount"] == {"type": "number"}


def test_non_json_responses_pass_through(responses):
    for key in ("retail.error", "airline.calculate", "airline.transfer"):
        assert mask_to_schema(responses[key]) == responses[key]
    assert responses["retail.error"].startswith("Error: ")
    assert mask_to_schema("Status Bar: 📶 Excellent | 5G") == "Status Bar: 📶 Excellent | 5G"
    assert mask_to_schema("{not json") == "{not json"
    assert mask_to_schema("[]") == json.dumps({"type": "array", "items": {}})


def test_merge_rules():
    assert merge_schemas([{"type": "integer"}, {"type": "number"}]) == {"type": "number"}
    assert merge_schemas([{"type": "string"}, {"type": "null"}]) == {"type": "string", "nullable": True}
    assert merge_schemas([{"type": "string"}, {"type": "integer"}]) == {
        "anyOf": [{"type": "string"}, {"type": "integer"}]
    }
    assert json_schema([{"a": 1}, {"b": "x"}, None]) == {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
            "nullable": True,
        },
    }
    assert json_schema(
        {"2024-05-16": {"status": "available"}, "2024-05-17": {"status": "landed", "actual": "10:00"}}
    ) == {
        "type": "object",
        "additionalProperties": {
            "type": "object",
            "properties": {"status": {"type": "string"}, "actual": {"type": "string"}},
        },
    }
