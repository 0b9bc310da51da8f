"""How late this process's event loop runs what is due: its recent lag.

A saturated server runs every callback late — the timer that cuts a stream at its
deadline, and then the write of the stream's final event. The final event's margin
(deadline.py) must cover that lateness, or the caller's own deadline wins the race and
the event promised on every started stream is lost. A task wakes every ``interval_s``
and measures how late it woke; :meth:`LoopLag.recent` is the largest lateness seen
lately, forgotten gradually (halved every ``half_life_s``), so one long stall widens the
margins of the calls that start in the next seconds, not forever.

Written by hand: a sleep and a subtraction; no library measures asyncio lag this way
without patching the loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from chatgate_server.background import stop_tasks

INTERVAL_S = 0.1
HALF_LIFE_S = 5.0
_LN2 = math.log(2)


class LoopLag:
    def __init__(
        self,
        *,
        interval_s: float = INTERVAL_S,
        half_life_s: float = HALF_LIFE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._half_life_s = half_life_s
        self._clock = clock
        self._lag = 0.0
        self._at = clock()
        self._task: asyncio.Task[None] | None = None

    def recent(self) -> float:
        """The largest lateness seen lately, in seconds, decayed since it was seen."""
        return self._lag * math.exp(-_LN2 * (self._clock() - self._at) / self._half_life_s)

    def observe(self, lag: float) -> None:
        """One wake-up ``lag`` seconds late."""
        if lag >= self.recent():
            self._lag, self._at = lag, self._clock()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="loop-lag")

    async def stop(self) -> None:
        await stop_tasks(self._task)
        self._task = None

    async def _watch(self) -> None:
        while True:
            due = self._clock() + self._interval_s
            await asyncio.sleep(self._interval_s)
            self.observe(max(self._clock() - due, 0.0))


NO_LAG = LoopLag()
"""Never started: always 0 (tests, tools)."""
