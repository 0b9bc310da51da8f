"""A tiny JSON-schema checker for tests: the keywords the simulator's generator covers.

Written independently of ``simulator/schema_example.py`` so a test compares the
generator against the schema's meaning, not against itself. Returns the problems
found (empty: the value fits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def problems(value: Any, schema: Any, root: Any = None, path: str = "$") -> list[str]:
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return []
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return problems(value, target, root, path)
    found: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if not any(_TYPES[k](value) for k in kinds):
            return [f"{path}: {value!r} is not {kinds}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{path}: not the const")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: {value!r} not in enum")
    for key in ("anyOf", "oneOf"):
        if key in schema:
            fits = sum(not problems(value, s, root, path) for s in schema[key])
            if fits == 0 or (key == "oneOf" and fits > 1):
                found.append(f"{path}: {key} matched {fits}")
    for sub in schema.get("allOf", ()):
        found += problems(value, sub, root, path)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        found += [f"{path}: missing {n}" for n in schema.get("required", ()) if n not in value]
        if schema.get("additionalProperties") is False:
            found += [f"{path}: extra {n}" for n in value if n not in props]
        for name, item in value.items():
            if name in props:
                found += problems(item, props[name], root, f"{path}.{name}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            found.append(f"{path}: fewer than minItems")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            found.append(f"{path}: more than maxItems")
        for i, item in enumerate(value):
            found += problems(item, schema.get("items", {}), root, f"{path}[{i}]")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            found.append(f"{path}: shorter than minLength")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            found.append(f"{path}: longer than maxLength")
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        checks: list[tuple[str, Callable[[float], bool]]] = [
            ("minimum", lambda b: number >= b),
            ("maximum", lambda b: number <= b),
            ("exclusiveMinimum", lambda b: number > b),
            ("exclusiveMaximum", lambda b: number < b),
            ("multipleOf", lambda b: (number / b) == int(number / b)),
        ]
        found += [f"{path}: {key}" for key, ok in checks if key in schema and not ok(schema[key])]
    return found
