"""How late the event loop runs: the sign that a worker is saturated.

When a worker's one event loop is busy, grpc.aio admits new calls only as running ones
finish (it asks gRPC for one call at a time), so the excess waits inside gRPC before
chatgate sees it: nothing in chatgate's spans, usage rows or call metrics shows the wait,
and gRPC cancels a call left waiting 30 s. How much later than asked a short timer fires
measures that busyness directly, so it is recorded (``chatgate.event_loop.lag``) and a
worker that falls seconds behind says so in its log. docs/PERFORMANCE.md ("Many slow
streams") has the measurements behind this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class LoopLagMonitor:
    """Every ``interval_s``, records how late the loop ran a timer (seconds, ≥ 0)."""

    def __init__(
        self,
        record: Callable[[float], None],
        *,
        interval_s: float = 0.25,
        warn_above_s: float = 1.0,
        warn_every_s: float = 30.0,
    ) -> None:
        self._record = record
        self._interval_s = interval_s
        self._warn_above_s = warn_above_s
        self._warn_every_s = warn_every_s
        self._last_warning = float("-inf")
        self._task: asyncio.Task[None] | None = None
        #: The largest lag seen so far (for tests and debugging).
        self.max_lag_s = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self._interval_s
            await asyncio.sleep(self._interval_s)
            self._observe(max(loop.time() - asked, 0.0))

    def _observe(self, lag: float) -> None:
        self.max_lag_s = max(self.max_lag_s, lag)
        self._record(lag)
        now = time.monotonic()
        if lag > self._warn_above_s and now - self._last_warning >= self._warn_every_s:
            self._last_warning = now
            log.warning(
                "event loop %.1fs behind: this worker is saturated, and new calls wait inside "
                "gRPC before chatgate sees them (add workers or replicas)",
                lag,
            )
