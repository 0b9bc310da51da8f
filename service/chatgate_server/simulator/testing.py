"""Small helpers for tests that read the simulator's streams and records directly.

Deliberately simple: they expect the simulator's own framing (``data: …`` lines and
blank lines, LF only). chatgate's real SSE parser lives elsewhere and must be more
forgiving.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from .keys import fingerprint
from .records import RequestRecord

__all__ = [
    "DONE",
    "ToolCallSeen",
    "content_of",
    "fingerprint",
    "keys_seen",
    "sse_chunks",
    "sse_data",
    "tool_calls_of",
]

DONE = "[DONE]"


def sse_data(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (``[DONE]`` included)."""
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


def sse_chunks(text: str) -> list[dict[str, Any]]:
    """Every payload but ``[DONE]``, parsed as JSON (raises on a malformed one)."""
    return [orjson.loads(data) for data in sse_data(text) if data != DONE]


def content_of(chunks: list[dict[str, Any]], field: str = "content") -> str:
    """The concatenated ``delta[field]`` of the chunks (``content`` or ``refusal``)."""
    return "".join(
        choice["delta"].get(field) or "" for chunk in chunks for choice in chunk.get("choices", ())
    )


@dataclass(slots=True)
class ToolCallSeen:
    """A tool call put together from its fragments."""

    index: int
    call_id: str = ""
    name: str = ""
    arguments: str = ""


def tool_calls_of(chunks: list[dict[str, Any]]) -> dict[int, ToolCallSeen]:
    """Tool calls by index, fragments concatenated per index."""
    calls: dict[int, ToolCallSeen] = {}
    for chunk in chunks:
        for choice in chunk.get("choices", ()):
            for fragment in choice["delta"].get("tool_calls") or ():
                call = calls.setdefault(fragment["index"], ToolCallSeen(fragment["index"]))
                call.call_id = fragment.get("id") or call.call_id
                function = fragment.get("function") or {}
                call.name = function.get("name") or call.name
                call.arguments += function.get("arguments") or ""
    return calls


def keys_seen(records: Iterable[RequestRecord]) -> set[str | None]:
    """Which keys reached a simulator: their names when it was given named keys, else
    their fingerprints (compare with ``fingerprint(key)``); None for a request without one.

    With several simulators as deployments, ``keys_seen(sim.requests) == {"east"}`` proves
    no other deployment's key reached this one."""
    return {record.key_name or record.key_fingerprint for record in records}
