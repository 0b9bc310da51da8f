"""A circuit breaker per upstream: stop sending calls to an upstream that keeps failing.

Hand-written because it is ~150 lines and must follow chatgate's own rules, which the
libraries we looked at (pybreaker, aiobreaker, purgatory) don't all offer together:
async-safe without locks (one event loop), an injected clock for tests, exactly one
probe while half-open, a cool-down that grows on repeated opens, a failure-rate rule
over a sliding window, and a third result besides success and failure — a cancelled
call (the caller left) says nothing about the upstream's health and must not move the
breaker.

When it opens. Over the last ``window_s`` seconds (default 10), at least
``failure_threshold`` calls (default 5) failed, and the failures are at least
``failure_rate`` (default 50 %) of the calls seen: those that ended in the window plus
those still running. A fully failing upstream therefore still opens it on the 5th
failure; a mostly healthy one never does. The seed rule, "5 consecutive failures",
opened on an upstream where ~9 % of calls failed: with hundreds of calls in flight,
failures (fast) land in bursts between successes (slow streams that end later), and
five in a row came within a second.

What counts (``completion.py`` decides): errors that say the upstream cannot answer
(5xx, timeouts, connection failures, rate limits that outlived the retries, no first
event before the deadline). A stream that fails *after* it delivered content does not
count: the upstream accepted, authenticated and answered that call, so it is up, and
opening the breaker would turn a partial failure (a few cut streams, which retrying at
once could not have saved) into refusing every call. Caller mistakes and cancellations
never count.

    CLOSED ──(failure rule above)──▶ OPEN
    OPEN ──(cool-down over; the next call is the probe)──▶ HALF_OPEN
    HALF_OPEN ──probe succeeds──▶ CLOSED        (cool-down and window reset)
    HALF_OPEN ──probe fails──▶ OPEN             (cool-down doubles, capped)
    HALF_OPEN ──probe cancelled──▶ HALF_OPEN    (the next call probes)

While OPEN or HALF_OPEN only the probe moves the state: a call that started before the
breaker opened (a long stream) and ends meanwhile says how the upstream was then.
"""

from __future__ import annotations

import collections
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


# The window is kept as this many buckets: O(1) per call whatever the call rate.
_BUCKETS = 10


class _Window:
    """Calls ended and failures among them over the last ``width_s`` seconds."""

    def __init__(self, width_s: float, clock: Callable[[], float]) -> None:
        self._width = width_s
        self._step = width_s / _BUCKETS
        self._clock = clock
        # [bucket start, calls ended, failures], oldest first.
        self._buckets: collections.deque[list[float]] = collections.deque()
        self.calls = 0
        self.failures = 0

    def add(self, failed: bool) -> None:
        now = self._clock()
        self._expire(now)
        if not self._buckets or now >= self._buckets[-1][0] + self._step:
            self._buckets.append([now, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        self.calls += 1
        if failed:
            bucket[2] += 1
            self.failures += 1

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self._width:
            _, calls, failures = self._buckets.popleft()
            self.calls -= int(calls)
            self.failures -= int(failures)

    def clear(self) -> None:
        self._buckets.clear()
        self.calls = self.failures = 0


class CircuitBreaker:
    """Watches upstream failures over a sliding window; while open, calls fail at once."""

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        window_s: float = 10.0,
        failure_rate: float = 0.5,
        cooldown_s: float = 30.0,
        max_cooldown_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Listener | None = None,
    ) -> None:
        self.name = name
        self._threshold = failure_threshold
        self._rate = failure_rate
        self._window = _Window(window_s, clock)
        self._in_flight = 0
        self._base_cooldown = cooldown_s
        self._max_cooldown = max_cooldown_s
        self._clock = clock
        self._listeners: list[Listener] = [on_transition] if on_transition else []
        self._state = BreakerState.CLOSED
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

    @property
    def in_flight(self) -> int:
        """Calls holding a permit that has not reported yet."""
        return self._in_flight

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
            self._in_flight += 1
            return Permit(self, probe=True)
        self._in_flight += 1
        return Permit(self, probe=False)

    def _record(self, permit: Permit, ok: bool | None) -> None:
        self._in_flight -= 1
        if permit.probe:
            self._probe_in_flight = False
        if ok is None:
            return  # cancelled: says nothing about the upstream
        self._window.add(failed=not ok)
        if self._state is not BreakerState.CLOSED:
            # Only the probe speaks for the upstream now: a call that started before the
            # breaker opened (a long stream) ending well or badly says how the upstream
            # was then, and must neither close the breaker mid-outage (resetting its
            # growing cool-down) nor reopen it while the probe is out.
            if permit.probe:
                self._probe_done(ok)
            return
        if not ok and self._failing():
            self._open()

    def _probe_done(self, ok: bool) -> None:
        if ok:
            self._opens = 0
            self._window.clear()
            self._transition(BreakerState.CLOSED)
        else:
            self._open()

    def _failing(self) -> bool:
        """The rule in the module docstring: enough failures, and a high enough share."""
        failures = self._window.failures
        seen = self._window.calls + self._in_flight
        return failures >= self._threshold and failures >= self._rate * seen

    def _open(self) -> None:
        self._window.clear()
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
