"""A value that fits a JSON schema: the simulated model's structured output and tool arguments.

Deterministic (the same schema always gives the same value) and simple: it covers
what structured outputs and tool definitions use — objects with ``properties`` and
``required``, arrays (``items``, ``minItems``/``maxItems``), strings (``enum``,
``const``, a few ``format``s, ``minLength``/``maxLength``), numbers and integers
(``minimum``/``maximum``, exclusive bounds, ``multipleOf``), booleans, null,
``anyOf``/``oneOf``/``allOf`` (the first usable branch), ``type`` lists and local
``$ref`` (``#/$defs/…``, ``#/definitions/…``). It is not a validator: a schema with
contradictory constraints gets a best-effort value.
"""

from __future__ import annotations

import math
from typing import Any

# Every string is this word unless the schema says otherwise (kept from the first
# simulator, whose tool arguments tests already know: {"city": "Paris"}).
STRING = "Paris"
_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "uri": "https://example.com/",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}
# Recursive schemas ($ref to itself) stop growing here: the optional parts are left out
# and arrays stay at their minimum length.
_MAX_DEPTH = 8


def example_for(schema: Any) -> Any:
    """A value that fits ``schema`` (``{}`` for a schema that is not an object)."""
    if not isinstance(schema, dict):
        return {}
    return _value(schema, schema, 0)


def _value(schema: Any, root: dict[str, Any], depth: int) -> Any:
    if not isinstance(schema, dict) or depth > 4 * _MAX_DEPTH:
        return STRING  # `true`, a malformed schema, or one with no finite instance
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            return _value(_pick(branches, root, depth), root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        return _value(_merge(schema["allOf"], root), root, depth + 1)
    kind = _kind(schema)
    if kind == "object":
        return _object(schema, root, depth)
    if kind == "array":
        return _array(schema, root, depth)
    if kind == "integer":
        return _integer(schema)
    if kind == "number":
        return _number(schema)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _string(schema)


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow local ``$ref``s (``#/$defs/Name``); the referring schema's own keys win."""
    for _ in range(_MAX_DEPTH):
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#"):
            break
        target: Any = root
        for part in filter(None, ref[1:].split("/")):
            name = part.replace("~1", "/").replace("~0", "~")
            target = target.get(name) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            break
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _pick(branches: list[Any], root: dict[str, Any], depth: int) -> Any:
    """The first branch that is not null; deep in a recursive schema, null if offered."""

    def is_null(branch: Any) -> bool:
        return isinstance(branch, dict) and _kind(_resolve(branch, root)) == "null"

    want_null = depth >= _MAX_DEPTH
    for branch in branches:
        if is_null(branch) == want_null:
            return branch
    return branches[0]


def _merge(parts: list[Any], root: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for part in parts:
        if isinstance(part, dict):
            part = _resolve(part, root)
            properties = {**merged.get("properties", {}), **part.get("properties", {})}
            required = [*merged.get("required", []), *part.get("required", [])]
            merged.update(part)
            if properties:
                merged["properties"] = properties
            if required:
                merged["required"] = required
    return merged


def _kind(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null" if kind else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


def _object(schema: dict[str, Any], root: dict[str, Any], depth: int) -> dict[str, Any]:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    required = schema.get("required")
    if isinstance(required, list):
        names = [name for name in required if name in properties]
    elif depth < _MAX_DEPTH:
        names = list(properties)  # no `required`: show every property
    else:
        names = []
    return {name: _value(properties[name], root, depth + 1) for name in names}


def _array(schema: dict[str, Any], root: dict[str, Any], depth: int) -> list[Any]:
    low = schema.get("minItems")
    high = schema.get("maxItems")
    count = low if isinstance(low, int) and low > 0 else (0 if depth >= _MAX_DEPTH else 1)
    if isinstance(high, int):
        count = min(count, high)
    prefix = schema.get("prefixItems")
    if isinstance(prefix, list) and prefix:
        head = [_value(item, root, depth + 1) for item in prefix]
        return head + [_value(schema.get("items", {}), root, depth + 1)] * max(0, count - len(head))
    item = _value(schema.get("items", {}), root, depth + 1)
    return [item] * count


def _integer(schema: dict[str, Any]) -> int:
    low, high = _bounds(schema, 1)
    value = math.ceil(low) if low is not None else 1
    if high is not None and value > high:
        value = math.floor(high)
    step = schema.get("multipleOf")
    if isinstance(step, int) and step > 0 and value % step:
        value += step - value % step
    return value


def _number(schema: dict[str, Any]) -> float:
    low, high = _bounds(schema, 0)
    value = 1.5
    if low is not None and high is not None and not low <= value <= high:
        value = (low + high) / 2
    elif low is not None and value < low:
        value = low + 1
    elif high is not None and value > high:
        value = high - 1
    step = schema.get("multipleOf")
    if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
        value = math.ceil(value / step) * step
    return value


def _bounds(schema: dict[str, Any], unit: float) -> tuple[float | None, float | None]:
    """The bounds, an exclusive one moved ``unit`` inwards (1 for integers; numbers
    keep it and pick a value strictly inside)."""
    low = _num(schema.get("minimum"))
    high = _num(schema.get("maximum"))
    exclusive_low = _num(schema.get("exclusiveMinimum"))
    exclusive_high = _num(schema.get("exclusiveMaximum"))
    if exclusive_low is not None:
        low = max(low if low is not None else -math.inf, exclusive_low + unit)
    if exclusive_high is not None:
        high = min(high if high is not None else math.inf, exclusive_high - unit)
    return low, high


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _string(schema: dict[str, Any]) -> str:
    fmt = schema.get("format")
    text = _FORMATS.get(fmt, STRING) if isinstance(fmt, str) else STRING
    low = schema.get("minLength")
    high = schema.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        text = (text * (low // len(text) + 1))[:low]
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    return text
