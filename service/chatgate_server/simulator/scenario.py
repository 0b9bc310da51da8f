"""The scenario spec: how one request asks the simulator to behave.

A spec is a comma-separated list of ``key=value`` pairs and bare ``key`` flags::

    spec  := item ("," item)*
    item  := KEY | KEY "=" VALUE            (whitespace around items is ignored)

It reaches the simulator as a model-name suffix (``gpt-4o-mini::status=500,times=2``)
and/or the ``x-simulator-scenario`` header; both are joined (header first, so the model
suffix wins a repeated key). Unknown keys and bad values are errors, answered with a
400, so that a typo in a test fails loudly instead of silently running the happy path.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, fields, replace
from typing import Any

MODEL_SEPARATOR = "::"

# Keys that choose what the response is; at most one may be given, because combining
# them (a 500 that also stalls?) has no single sensible meaning.
OUTCOME_KEYS = (
    "status",
    "rate_limit",
    "insufficient_quota",
    "too_large",
    "content_filter",
    "hang",
    "stall_after",
    "disconnect_after",
    "error_event_after",
    "content_filter_after",
)

_INT_KEYS = frozenset(
    {
        "chunks",
        "delay_ms",
        "headers_delay_ms",
        "status",
        "times",
        "retry_after_ms",
        "retry_after",
        "stall_after",
        "disconnect_after",
        "error_event_after",
        "content_filter_after",
        "malformed_after",
    }
)
_FLAG_KEYS = frozenset(
    {
        "rate_limit",
        "insufficient_quota",
        "too_large",
        "content_filter",
        "hang",
        "no_done",
        "no_usage",
        "refusal",
        "parallel_tools",
        "no_retry_after",
    }
)
_BOOL_KEYS = frozenset({"should_retry"})
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
# Guards against a spec that would make the simulator build a huge response by mistake.
_MAX_INT = 10_000_000


class ScenarioError(ValueError):
    """A spec that cannot be parsed; the message names the bad item."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """A parsed spec. ``None`` means "not given": the server default applies.

    ``text`` is the spec as received (header part, then model suffix, joined by ",");
    it keys ``times`` when the request carries no ``x-client-request-id``.
    """

    text: str = ""
    chunks: int | None = None
    delay_ms: int | None = None
    headers_delay_ms: int = 0
    status: int | None = None
    times: int | None = None
    rate_limit: bool = False
    insufficient_quota: bool = False
    too_large: bool = False
    content_filter: bool = False
    retry_after_ms: int | None = None
    retry_after: int | None = None
    no_retry_after: bool = False
    should_retry: bool | None = None
    hang: bool = False
    stall_after: int | None = None
    disconnect_after: int | None = None
    error_event_after: int | None = None
    content_filter_after: int | None = None
    malformed_after: int | None = None
    no_done: bool = False
    no_usage: bool = False
    refusal: bool = False
    parallel_tools: bool = False

    @property
    def error_status(self) -> int | None:
        """The HTTP error status this scenario answers with, if it is an error scenario."""
        if self.status is not None:
            return self.status
        if self.rate_limit or self.insufficient_quota or self.too_large:
            return 429
        if self.content_filter:
            return 400
        return None

    def applies_to(self, attempt: int) -> bool:
        """Whether the fault applies on this attempt (``times=N`` limits it to the first N)."""
        return self.times is None or attempt <= self.times


EMPTY = Scenario()
_FIELD_NAMES = frozenset(f.name for f in fields(Scenario)) - {"text"}

# What each key does, for `--help` and docs/SIMULATOR.md (a test keeps it complete).
# fmt: off
KEY_HELP: dict[str, tuple[str, str]] = {
    "chunks": ("N", "content chunks in the reply (default: --chunks)"),
    "delay_ms": ("N", "pause before each chunk, ms (default: --delay-ms)"),
    "headers_delay_ms": ("N", "pause before the response headers, ms"),
    "status": ("CODE", "answer HTTP CODE (400-599) with OpenAI's error body for it"),
    "times": ("N", "apply the fault to the first N attempts only, then answer normally "
                   "(attempts counted per x-client-request-id, else per spec)"),
    "rate_limit": ("", "429 rate_limit_exceeded with retry-after-ms (default 100) "
                       "and x-ratelimit-* headers"),
    "insufficient_quota": ("", "429 insufficient_quota (billing: retrying never helps)"),
    "too_large": ("", "429 'Request too large' for the tokens-per-minute limit"),
    "content_filter": ("", "400 content_filter: the prompt tripped Azure's content filter"),
    "retry_after_ms": ("N", "send retry-after-ms: N with the error"),
    "retry_after": ("N", "send retry-after: N (seconds) with the error"),
    "no_retry_after": ("", "send no retry-after header at all"),
    "should_retry": ("BOOL", "send x-should-retry: true|false with the error"),
    "hang": ("", "never send the response headers"),
    "stall_after": ("N", "stop after N content chunks and keep the connection open"),
    "disconnect_after": ("N", "close the connection after N content chunks"),
    "error_event_after": ("N", "after N content chunks, an error event in the stream"),
    "content_filter_after": ("N", "after N content chunks, finish with content_filter (the "
                                  "answer was filtered; Azure flags the category)"),
    "malformed_after": ("N", "after N content chunks, an event that is not JSON"),
    "no_done": ("", "leave out the final 'data: [DONE]'"),
    "no_usage": ("", "leave out the usage chunk even when stream_options asks for it"),
    "refusal": ("", "answer with a refusal instead of text or tool calls"),
    "parallel_tools": ("", "call the first two tools at once (when two or more are offered)"),
}
# fmt: on


def scenario_keys_help() -> str:
    """One line per key, in the order of ``Scenario``'s fields: ``key=VALUE  what it does``."""
    lines = []
    for f in fields(Scenario):
        if f.name == "text":
            continue
        value, what = KEY_HELP[f.name]
        item = f"{f.name}={value}" if value else f.name
        outcome = " (outcome)" if f.name in OUTCOME_KEYS else ""
        lines.append(
            textwrap.fill(f"{what}{outcome}", 88, initial_indent=f"  {item:<23}", subsequent_indent=" " * 25)
        )
    return "\n".join(lines)


def split_model(model: str) -> tuple[str, str]:
    """Split ``"gpt-4o::status=500"`` into ``("gpt-4o", "status=500")``; no suffix → ``""``."""
    name, _, spec = model.partition(MODEL_SEPARATOR)
    return name, spec


def parse_scenario(text: str) -> Scenario:
    """Parse a spec string (see the module docstring). Raises ScenarioError."""
    text = text.strip()
    if not text:
        return EMPTY
    values: dict[str, Any] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        values[key] = _parse_value(key, value if sep else None)
    scenario = replace(EMPTY, text=text, **values)
    _check(scenario)
    return scenario


def _parse_value(key: str, value: str | None) -> int | bool:
    if key not in _FIELD_NAMES:
        raise ScenarioError(f"unknown scenario key {key!r}")
    if key in _FLAG_KEYS:
        if value is None:
            return True
        return _parse_bool(key, value)
    if value is None or value == "":
        raise ScenarioError(f"scenario key {key!r} needs a value")
    if key in _BOOL_KEYS:
        return _parse_bool(key, value)
    assert key in _INT_KEYS
    try:
        number = int(value)
    except ValueError:
        raise ScenarioError(f"scenario key {key!r} needs an integer, got {value!r}") from None
    if not 0 <= number <= _MAX_INT:
        raise ScenarioError(f"scenario key {key!r} out of range: {number}")
    return number


def _parse_bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ScenarioError(f"scenario key {key!r} needs true or false, got {value!r}")


def _check(scenario: Scenario) -> None:
    given = [key for key in OUTCOME_KEYS if getattr(scenario, key) not in (None, False)]
    if len(given) > 1:
        raise ScenarioError(f"scenario keys {', '.join(given)} cannot be combined")
    if scenario.status is not None and not 400 <= scenario.status <= 599:
        raise ScenarioError(f"scenario status must be 400-599, got {scenario.status}")
    if scenario.times is not None and scenario.times < 1:
        raise ScenarioError("scenario key 'times' must be at least 1")
