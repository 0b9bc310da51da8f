"""What the simulated model answers: JSON that fits a schema, text after tool results,
the model list, and a ``--help`` that documents every scenario key."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from chatgate_server.simulator.cli import build_parser
from chatgate_server.simulator.content import plan_reply, structured_output
from chatgate_server.simulator.models import CONTEXT_WINDOWS, context_window
from chatgate_server.simulator.scenario import KEY_HELP, Scenario
from chatgate_server.simulator.schema_example import example_for
from tests.schema_check import problems

SCENARIO_KEYS = [f.name for f in fields(Scenario) if f.name != "text"]

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "active": {"type": "boolean"},
            "tier": {"type": "string", "enum": ["gold", "silver"]},
            "note": {"type": ["string", "null"]},
        },
        "required": ["name", "age", "score", "active", "tier", "note"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "order": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "lines": {
                        "type": "array",
                        "minItems": 2,
                        "items": {
                            "type": "object",
                            "properties": {
                                "sku": {"type": "string", "minLength": 8},
                                "qty": {"type": "integer"},
                            },
                            "required": ["sku", "qty"],
                            "additionalProperties": False,
                        },
                    },
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
                },
                "required": ["id", "lines", "tags"],
                "additionalProperties": False,
            },
            "kind": {"const": "order"},
        },
        "required": ["order", "kind"],
        "additionalProperties": False,
    },
    "refs_and_unions": {
        "$defs": {
            "step": {
                "type": "object",
                "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
                "required": ["explanation", "output"],
                "additionalProperties": False,
            },
            "node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer"},
                    "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
                },
                "required": ["value", "next"],
                "additionalProperties": False,
            },
        },
        "type": "object",
        "properties": {
            "steps": {"type": "array", "items": {"$ref": "#/$defs/step"}},
            "final": {"anyOf": [{"type": "number", "multipleOf": 0.5}, {"type": "null"}]},
            "list": {"$ref": "#/$defs/node"},
            "both": {"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                               {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
        },
        "required": ["steps", "final", "list", "both"],
        "additionalProperties": False,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_the_example_fits_its_schema_and_is_deterministic(name: str) -> None:
    schema = SCHEMAS[name]
    value = example_for(schema)
    assert problems(value, schema) == [], value
    assert example_for(schema) == value


def test_json_schema_response_format_gives_parseable_fitting_json() -> None:
    schema = SCHEMAS["nested"]
    text = structured_output({"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}, 12)
    assert text is not None
    assert problems(json.loads(text), schema) == []
    answer = json.loads(structured_output({"type": "json_object"}, 3) or "")
    assert answer == {"answer": "The quick brown"}
    assert structured_output({"type": "text"}, 3) is None


def test_after_a_tool_result_the_model_answers_with_text() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    call = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {}}]}
    answered = [*asked, call, {"role": "tool", "tool_call_id": "c1", "content": "21C"}]

    first = plan_reply({"messages": asked, "tools": tools}, chunks=4, refusal=False, parallel_tools=False)
    assert first.finish_reason == "tool_calls"
    after = plan_reply({"messages": answered, "tools": tools}, chunks=4, refusal=False, parallel_tools=False)
    assert (after.finish_reason, after.tool_calls, after.words) == ("stop", (), 4)
    # A forced choice still calls, as the real API does.
    forced = {"messages": answered, "tools": tools, "tool_choice": "required"}
    assert plan_reply(forced, chunks=4, refusal=False, parallel_tools=False).tool_calls


def test_known_models_snapshots_and_any_model() -> None:
    assert context_window("gpt-4o-mini") == 128_000
    assert context_window("gpt-4o-mini-2024-07-18") == 128_000
    assert context_window("gpt-4") == 8_192
    assert context_window("gpt-4o-minii") is None
    assert context_window("my-model") is None
    assert context_window("my-model", any_model=True) == 128_000
    # Fine-tunes are served when their base model is.
    assert context_window("ft:gpt-4o-mini-2024-07-18:acme:support:9Ab3dEfG") == 128_000
    assert context_window("ft:my-model:acme:support:9Ab3dEfG") is None


def test_every_scenario_key_is_documented_in_help() -> None:
    assert set(KEY_HELP) == set(SCENARIO_KEYS)
    text = build_parser().format_help()
    assert text.startswith("usage: chatgate simulator ")
    for key in SCENARIO_KEYS:
        assert f"\n  {key}" in text, key
    assert "--any-model" in text


def test_the_chatgate_command_shows_the_scenarios() -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "chatgate_server", "simulator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("usage: chatgate simulator ")
    assert all(f"\n  {key}" in ran.stdout for key in SCENARIO_KEYS)


def test_the_docs_list_every_scenario_key_and_model() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "SIMULATOR.md").read_text()
    table = {m[1] for m in re.finditer(r"^\| `(\w+)[=`]", docs, re.MULTILINE)}
    assert set(SCENARIO_KEYS) <= table
    for model, window in CONTEXT_WINDOWS.items():
        row = next(line for line in docs.splitlines() if f"`{model}`" in line)
        assert row.endswith(f"| {window} |"), model
