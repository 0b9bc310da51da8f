"""One deadline per request, computed once when the call starts and passed down."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


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
    ) -> Deadline:
        """The earlier of the caller's deadline (seconds left, or None) and the cap."""
        now = clock()
        if caller_remaining is not None and caller_remaining < cap:
            return cls(now + max(caller_remaining, 0.0), set_by_cap=False, clock=clock)
        return cls(now + cap, set_by_cap=True, clock=clock)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(self.expires_at - self.clock(), 0.0)

    @property
    def expired(self) -> bool:
        return self.clock() >= self.expires_at
