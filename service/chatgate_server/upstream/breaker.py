"""A circuit breaker per upstream: stop sending calls to an upstream that keeps failing.

Hand-written because it is ~100 lines and must follow chatgate's own rules, which the
libraries we looked at (pybreaker, aiobreaker, purgatory) don't all offer together:
async-safe without locks (one event loop), an injected clock for tests, exactly one
probe while half-open, a cool-down that grows on repeated opens, and a third result
besides success and failure — a cancelled call (the caller left) says nothing about
the upstream's health and must not move the breaker.

    CLOSED ──(threshold consecutive failures)──▶ OPEN
    OPEN ──(cool-down over; the next call is the probe)──▶ HALF_OPEN
    HALF_OPEN ──probe succeeds──▶ CLOSED        (cool-down resets)
    HALF_OPEN ──probe fails──▶ OPEN             (cool-down doubles, capped)
    HALF_OPEN ──probe cancelled──▶ HALF_OPEN    (the next call probes)
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

from chatgate_server.errors import BreakerOpen

log = logging.getLogger(__name__)


class BreakerState(enum.IntEnum):
    """Values double as the breaker-state metric: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


Listener = Callable[[str, BreakerState, BreakerState], None]


class CircuitBreaker:
    """Counts consecutive upstream failures; while open, calls fail at once."""

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        cooldown_s: float = 30.0,
        max_cooldown_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Listener | None = None,
    ) -> None:
        self.name = name
        self._threshold = failure_threshold
        self._base_cooldown = cooldown_s
        self._max_cooldown = max_cooldown_s
        self._clock = clock
        self._listeners: list[Listener] = [on_transition] if on_transition else []
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opens = 0  # consecutive opens without a successful probe: scales the cool-down
        self._open_until = 0.0
        self._probe_in_flight = False

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose cool-down ended reads as half-open)."""
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            return BreakerState.HALF_OPEN
        return self._state

    def acquire(self) -> Permit:
        """Permission for one call, or BreakerOpen with the time to wait."""
        if self._state is BreakerState.OPEN:
            remaining = self._open_until - self._clock()
            if remaining > 0:
                raise BreakerOpen(
                    f"the upstream is failing; calls are paused for {remaining:.1f}s", retry_after=remaining
                )
            self._transition(BreakerState.HALF_OPEN)
        if self._state is BreakerState.HALF_OPEN:
            if self._probe_in_flight:
                raise BreakerOpen(
                    "the upstream is being probed after failures; retry shortly", retry_after=1.0
                )
            self._probe_in_flight = True
            return Permit(self, probe=True)
        return Permit(self, probe=False)

    def _record(self, permit: Permit, ok: bool | None) -> None:
        if permit.probe:
            self._probe_in_flight = False
        if ok is None:
            return  # cancelled: says nothing about the upstream
        if ok:
            self._failures = 0
            if self._state is not BreakerState.CLOSED:
                self._opens = 0
                self._transition(BreakerState.CLOSED)
            return
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or (
            self._state is BreakerState.CLOSED and self._failures >= self._threshold
        ):
            self._open()

    def _open(self) -> None:
        self._opens += 1
        cooldown = min(self._base_cooldown * 2 ** (self._opens - 1), self._max_cooldown)
        self._open_until = self._clock() + cooldown
        self._transition(BreakerState.OPEN, cooldown)

    def _transition(self, new: BreakerState, cooldown: float | None = None) -> None:
        old, self._state = self._state, new
        if old is new:
            return
        suffix = f" for {cooldown:.1f}s" if cooldown is not None else ""
        log.warning("circuit breaker %s: %s -> %s%s", self.name, old.name, new.name, suffix)
        for listener in self._listeners:
            listener(self.name, old, new)


class Permit:
    """One call's permission; report exactly one of success, failure or release."""

    __slots__ = ("_breaker", "_done", "probe")

    def __init__(self, breaker: CircuitBreaker, *, probe: bool) -> None:
        self._breaker = breaker
        self.probe = probe
        self._done = False

    def success(self) -> None:
        self._finish(True)

    def failure(self) -> None:
        self._finish(False)

    def release(self) -> None:
        """The call ended without telling us anything about the upstream (cancelled,
        or failed for a reason that is not the upstream's, such as a caller mistake)."""
        self._finish(None)

    def _finish(self, ok: bool | None) -> None:
        if not self._done:
            self._done = True
            self._breaker._record(self, ok)
