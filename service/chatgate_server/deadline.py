"""One deadline per request, computed once when the call starts and passed down.

When the caller's deadline is the one that ends the call, chatgate cuts the stream a
little *before* it (:func:`final_event_margin`): the proto promises a ``finished``
event (outcome, usage, cost) on every stream that started, and a stream cut at the
caller's exact deadline loses that race: the caller's gRPC library ends the call on
its own clock first and the final event is dropped. The margin leaves time to count
the tokens, send the event and end the call with DEADLINE_EXCEEDED ourselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

# The margin is 5 % of the caller's time left, at least 250 ms and at most 1 s, but
# never more than a quarter of the time left (a 200 ms call keeps 150 ms). The floor is
# measured, not derived: everything between the caller's library computing grpc-timeout
# and our reading it, and between our final event and the caller reading it, counts
# against the margin. On a loaded 2-core machine, with 50-75 ms the Node client
# (grpc-js) lost the final event in about half the runs; with 200 ms, in none.
MARGIN_FRACTION = 0.05
MIN_MARGIN_S = 0.25
MAX_MARGIN_S = 1.0
MAX_MARGIN_SHARE = 0.25


# A loop that runs late runs the cut late, and then the final event's write: the margin
# grows by twice the loop's recent lag (loop_lag.py), still within MAX_MARGIN_SHARE.
LAG_FACTOR = 2.0


def final_event_margin(caller_remaining: float, loop_lag: float = 0.0) -> float:
    """How long before the caller's deadline chatgate cuts the stream, given how late
    this process's event loop has lately been running what is due."""
    margin = min(max(caller_remaining * MARGIN_FRACTION, MIN_MARGIN_S), MAX_MARGIN_S)
    return min(margin + LAG_FACTOR * loop_lag, caller_remaining * MAX_MARGIN_SHARE)


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute point on a monotonic clock; everything below asks it for time left."""

    expires_at: float
    # Whether the service cap (not the caller's deadline) is what ends the call.
    set_by_cap: bool
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    @classmethod
    def start(
        cls,
        caller_remaining: float | None,
        cap: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        loop_lag: float = 0.0,
    ) -> Deadline:
        """The earlier of the caller's deadline (seconds left, or None; less the final
        event's margin, wider while the loop runs late) and the cap."""
        now = clock()
        if caller_remaining is not None:
            ours = caller_remaining - final_event_margin(caller_remaining, loop_lag)
            if ours < cap:
                return cls(now + max(ours, 0.0), set_by_cap=False, clock=clock)
        return cls(now + cap, set_by_cap=True, clock=clock)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(self.expires_at - self.clock(), 0.0)

    @property
    def expired(self) -> bool:
        return self.clock() >= self.expires_at
