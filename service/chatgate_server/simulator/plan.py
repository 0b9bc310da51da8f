"""A response plan: the head, the body events, how it ends and its delays; and the
stream faults that reshape one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .errors import ERROR_EVENT, MALFORMED_EVENT
from .scenario import Scenario
from .stream import Event

End = Literal["finish", "stall", "disconnect", "hang"]


@dataclass(slots=True)
class Plan:
    """How one response goes out.

    ``head`` is sent first (for a non-chunked response it already holds the body);
    then each of ``events`` as its own HTTP chunk, ``delay`` seconds apart; then by
    ``end``: finish (chunk terminator if ``chunked``), stall (send nothing more),
    disconnect (close without the terminator) or hang (not even the head).
    """

    status: int | None
    head: bytes
    events: list[Event] = field(default_factory=list)
    chunked: bool = False
    end: End = "finish"
    headers_delay: float = 0.0
    delay: float = 0.0


def apply_stream_faults(plan: Plan, scenario: Scenario) -> None:
    """Reshape a stream plan by the scenario's stream faults: malformed, hang, stall,
    disconnect, error event."""
    events = plan.events
    if scenario.malformed_after is not None:
        events.insert(_cut(events, scenario.malformed_after), (MALFORMED_EVENT, False))
    if scenario.hang:
        plan.end, plan.status = "hang", None
    elif scenario.stall_after is not None:
        del events[_cut(events, scenario.stall_after) :]
        plan.end = "stall"
    elif scenario.disconnect_after is not None:
        del events[_cut(events, scenario.disconnect_after) :]
        plan.end = "disconnect"
    elif scenario.error_event_after is not None:
        del events[_cut(events, scenario.error_event_after) :]
        events.append((ERROR_EVENT, False))


def _cut(events: list[Event], n: int) -> int:
    """The index just past the n-th content event (before the finish chunk if fewer)."""
    seen = 0
    last_content = 0
    for i, (_, is_content) in enumerate(events):
        if is_content:
            if seen == n:
                return i
            seen += 1
            last_content = i
    return last_content + 1
