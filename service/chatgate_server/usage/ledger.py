"""The usage ledger: records leave the request path at once and are written in batches.

A finished request calls :meth:`UsageLedger.submit`, which only puts the record on a
bounded in-memory queue. A background task takes whatever has accumulated (up to
``batch_size``) and writes it in one transaction through :class:`UsageStore`; under
load batches grow, so the number of round trips does not grow with the request rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from chatgate_server.domain import UsageRecord
from chatgate_server.usage.store import UsageStore

log = logging.getLogger(__name__)


class UsageSink(Protocol):
    def submit(self, record: UsageRecord) -> None:
        """Accept a record for writing; never blocks and never raises."""
        ...


class UsageLedger:
    """Bounded queue + one background writer."""

    def __init__(self, store: UsageStore, *, queue_size: int = 10000, batch_size: int = 500) -> None:
        self._store = store
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._writer: asyncio.Task[None] | None = None
        self.written = 0
        self.dropped = 0

    def start(self) -> None:
        self._writer = asyncio.create_task(self._run(), name="usage-ledger-writer")

    def submit(self, record: UsageRecord) -> None:
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            # TODO(issue 5): spool to disk instead; until then, say so loudly.
            self.dropped += 1
            log.error("usage ledger queue full; record %s not written", record.request_id)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def flush(self) -> None:
        """Wait until every record submitted so far has been written (or failed)."""
        await self._queue.join()

    async def close(self) -> None:
        """Write what is queued, then stop the writer."""
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                self.written += await self._store.insert(batch)
            except Exception:
                # TODO(issue 5): spool and replay. Logged without the rows' content.
                log.exception("usage ledger: writing %d records failed", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()
