"""Counts of calls refused at the edge without a usage row, per minute, per process.

Such a call (an invalid request, a taken request id, a model outside the caller's
allow-list refused before admission) leaves no row in usage_records, yet a caller
sending thousands of them is what the refusal-burst rule looks for. Counting it costs a
dictionary increment on the refused call; a background task adds the counts to
``refusal_counts`` every few seconds in one statement — never a write per call. Only
calls with a known caller count (an unauthenticated call names no tenant to charge it
to: the auth failure metric covers those), and only refusals of the caller's making:
INVALID_ARGUMENT, ALREADY_EXISTS and PERMISSION_DENIED (not a block), never this
replica's own overload or shutdown.

While Postgres is away the counts wait in memory, bounded: past ``max_keys`` distinct
(minute, tenant, caller, reason) keys new keys are dropped and the loss is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

from chatgate_server.background import stop_tasks
from chatgate_server.domain import Caller

log = logging.getLogger(__name__)

COUNTED_STATUSES = frozenset({"INVALID_ARGUMENT", "ALREADY_EXISTS", "PERMISSION_DENIED"})
NOT_COUNTED_REASONS = frozenset({"BLOCKED"})

Key = tuple[datetime, str, str, str]


class RefusalCounter:
    """Per-minute counts of refused calls by (tenant, caller, reason)."""

    def __init__(self, *, max_keys: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self._counts: dict[Key, int] = {}
        self._max_keys = max_keys
        self._clock = clock
        self._dropped = False

    def __call__(self, caller: Caller, status: str, reason: str) -> None:
        """One call of ``caller`` ended with ``status`` / ``reason`` and no usage row."""
        if status not in COUNTED_STATUSES or reason in NOT_COUNTED_REASONS:
            return
        minute = datetime.fromtimestamp(self._clock() // 60 * 60, UTC)
        self._add((minute, caller.tenant, caller.service, reason), 1)

    def take(self) -> dict[Key, int]:
        """Everything counted so far; the counter starts again from nothing."""
        counts, self._counts = self._counts, {}
        return counts

    def give_back(self, counts: Mapping[Key, int]) -> None:
        """Counts that could not be written: kept for the next flush (bounded)."""
        for key, calls in counts.items():
            self._add(key, calls)

    def _add(self, key: Key, calls: int) -> None:
        counts = self._counts
        if key in counts:
            counts[key] += calls
        elif len(counts) < self._max_keys:
            counts[key] = calls
        elif not self._dropped:
            self._dropped = True
            log.warning(
                "refusal counts: more than %d keys waiting to be written; dropping new ones", self._max_keys
            )


class RefusalFlusher:
    """Writes a counter's counts every ``every_s`` seconds (and once more at stop)."""

    def __init__(
        self,
        counter: RefusalCounter,
        write: Callable[[Mapping[Key, int]], Awaitable[None]],
        *,
        every_s: float = 10.0,
    ) -> None:
        self._counter = counter
        self._write = write
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="refusal-counts")

    async def stop(self) -> None:
        await stop_tasks(self._task)
        self._task = None
        await self.flush()

    async def flush(self) -> None:
        counts = self._counter.take()
        if not counts:
            return
        try:
            await self._write(counts)
        except Exception as exc:  # noqa: BLE001 - Postgres away: keep the counts, try again
            self._counter.give_back(counts)
            if not self._failing:
                log.warning("cannot write refusal counts (%s); keeping them in memory", type(exc).__name__)
            self._failing = True
        else:
            self._failing = False

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            await self.flush()
