"""The usage ledger: records leave the request path at once, and none is lost.

A finished request calls :meth:`UsageLedger.submit`, which only appends the record to an
in-memory queue: no I/O, no await, nothing that can fail. Background tasks do the rest:

- the **writer** lets records gather for ``linger_s`` (50 ms), takes what has
  accumulated (up to ``batch_size``) and inserts it in one transaction through
  :class:`UsageStore`; under load batches grow, so transactions (and WAL flushes) do
  not grow with the request rate. Without the linger a few hundred requests per second
  meant a commit per two rows, and Postgres's CPU on a small host cost a third of the
  request throughput (bench/ledger.py); with it the ledger costs nothing measurable.
  When an insert fails because Postgres is away (connection refused or lost, pool
  timeout, write timeout, schema missing) the batch goes to the :class:`Spool` on disk
  instead, and so does every batch after it until Postgres answers again — no request
  waits for a connection timeout.
- a write Postgres has **not answered** within ``spool_after_s`` (a server that accepts
  connections and hangs) does not hold its rows in memory for the whole write timeout:
  they go to the spool (fsync'd) while the write is still pending, Postgres counts as
  away (health says so) and later batches go to the spool too. Should the pending write
  land after all, the replay of those rows finds them stored and inserts nothing. So a
  row is only in memory, where a kill -9 would lose it, for about ``linger_s +
  spool_after_s``.
- the **replayer** probes Postgres with exponential backoff while it is away, then
  drains the spool oldest segment first (and at start-up drains what an earlier process
  left). Inserts are idempotent, so a replay that is interrupted and repeated, or that
  races the live writer, stores each record once.
- a **partition keeper** makes sure next months' partitions exist, at start and hourly.

A record Postgres refuses for what it holds (SQLSTATE classes 22, 23, 54: see
:mod:`~chatgate_server.usage.dberrors`) would fail its batch on every retry; such a
batch is split in halves until the refused records are alone, those go to the spool's
dead-letter file (counted, with an error log) and the rest are written — live and
when a spool is replayed alike. Dead letters are never replayed on their own:
``chatgate usage-dead-letters replay`` retries them after the cause is fixed.

The ledger is the first precondition of the admission chain
(:mod:`chatgate_server.admission`): :meth:`admit` refuses new calls with UNAVAILABLE when
the queue is at ``queue_size`` *and* the spool is full (or unusable): a call that cannot
be billed is not served (and leaves no row: there is no room for one). Records of calls
already admitted are never refused: the queue can exceed ``queue_size`` by the calls in
flight (at most ``CHATGATE_MAX_CONCURRENT_STREAMS``), which bounds memory.

The :class:`LedgerState` (``OK``, ``SPOOLING``, ``FULL``) goes to listeners on every
change; the composition root turns it into health statuses, and :meth:`stats` feeds the
metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import psycopg
from opentelemetry import trace

from chatgate_server.admission import NO_TICKET, Ticket
from chatgate_server.background import stop_tasks
from chatgate_server.domain import CompletionRequest, UsageRecord
from chatgate_server.errors import LedgerFull
from chatgate_server.usage.dberrors import describe, is_bad_record
from chatgate_server.usage.spool import Segment, Spool, SpoolFull
from chatgate_server.usage.store import UsageStore

log = logging.getLogger(__name__)


class UsageSink(Protocol):
    def submit(self, record: UsageRecord) -> None:
        """Accept a record for writing; never blocks and never raises."""
        ...


class LedgerState(enum.IntEnum):
    """How usage rows are getting to Postgres. Values double as the state metric."""

    OK = 0
    """Written straight to Postgres; nothing spooled."""
    SPOOLING = 1
    """Postgres is away or a spool is being replayed: rows are safe on disk, not yet in Postgres."""
    FULL = 2
    """Queue and spool both full: new calls are refused."""


@dataclass(frozen=True, slots=True)
class LedgerStats:
    """A snapshot for metrics, health and tests."""

    state: LedgerState
    postgres_ok: bool
    queued: int
    spooled_records: int
    spool_bytes: int
    written: int
    """Rows inserted (replays of rows already stored not counted)."""
    spooled: int
    """Records that went to the spool since start."""
    replayed: int
    """Spooled records inserted (or found already stored) since start; a replay that was
    interrupted and repeated counts again."""
    dead_lettered: int
    lost: int
    """Records that could be written nowhere at shutdown (logged as errors)."""


class WriteStuck(TimeoutError):
    """A write Postgres has not answered in ``spool_after_s``: its rows went to the spool."""


_Stored = tuple[list[UsageRecord], BaseException | None]
"""What :meth:`UsageLedger._write_records` left unwritten because Postgres went away, and why."""


# How much longer than ``spool_after_s`` a write may wait for a pool connection (a first
# connection on a loaded host took up to 0.3 s) before its rows are spooled.
_CONNECT_ALLOWANCE_S = 1.0

# Keys of dead-lettered rows remembered to write each letter once (a bound on memory).
_DEAD_KEYS_KEPT = 10_000

# The SDK keeps at most 128 links per span by default; more would be dropped anyway.
_MAX_LINKS = 128


def _links(records: Sequence[UsageRecord]) -> list[trace.Link]:
    links = []
    for record in records[:_MAX_LINKS]:
        if record.trace_id and record.span_id:
            context = trace.SpanContext(
                int(record.trace_id, 16),
                int(record.span_id, 16),
                is_remote=True,
                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
            )
            links.append(trace.Link(context, {"chatgate.request_id": record.request_id}))
    return links


class UsageLedger:
    """The queue, the writer, the spool and its replayer."""

    def __init__(
        self,
        store: UsageStore,
        spool: Spool,
        *,
        queue_size: int = 10000,
        batch_size: int = 500,
        write_timeout_s: float = 5.0,
        retry_base_s: float = 0.25,
        retry_cap_s: float = 30.0,
        postgres_ok: bool = True,
        partition_interval_s: float = 3600.0,
        linger_s: float = 0.05,
        spool_after_s: float = 0.2,
        tracer: trace.Tracer | None = None,
    ) -> None:
        """``spool`` must be open. ``postgres_ok``: whether Postgres answered at start-up
        (when not, the first batches go straight to the spool). ``write_timeout_s`` bounds
        each insert and probe, connection wait included. ``spool_after_s``: how long a
        live write may go unanswered before its rows are spooled (and Postgres counts as
        away) while it goes on in the background."""
        self._store = store
        self._spool = spool
        self._queue: deque[UsageRecord] = deque()
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._write_timeout_s = write_timeout_s
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._postgres_ok = postgres_ok
        self._partition_interval_s = partition_interval_s
        self._linger_s = linger_s
        self._spool_after_s = spool_after_s
        self._late_writes: set[asyncio.Task[_Stored]] = set()
        self._answered_at = 0.0  # loop time of Postgres's latest answer to an insert
        self._connected_at = 0.0  # loop time an insert last got its connection
        self._dead_keys: set[tuple[str, datetime]] = set()  # dead-lettered by this process
        self._tracer = tracer or trace.NoOpTracer()
        self._spool_broken = False
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._work = asyncio.Event()  # the writer has records
        self._replay = asyncio.Event()  # the replayer has something to do
        self._room = asyncio.Event()  # Postgres came back or the spool shrank
        self._submitted = 0
        self._settled = 0  # written, spooled, dead-lettered or lost
        self._settle_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._stored_waiters: list[asyncio.Future[None]] = []
        self._listeners: list[Callable[[LedgerState], None]] = []
        self._state = LedgerState.OK
        self._written = self._spooled = self._replayed = self._dead = self._lost = 0
        self._update_state()

    # --- the request path ------------------------------------------------------------

    async def admit(self, request: CompletionRequest) -> Ticket:
        """Refuse a call the ledger could not bill."""
        if self._state is LedgerState.FULL:
            raise LedgerFull(
                "usage ledger full: Postgres is unreachable and the spool is at its limit; "
                "this replica cannot bill new calls",
                retry_after=self._retry_cap_s,
            )
        return NO_TICKET

    def submit(self, record: UsageRecord) -> None:
        """Queue ``record`` for writing. Never blocks, never raises, never drops."""
        self._queue.append(record)
        self._submitted += 1
        self._work.set()
        if len(self._queue) >= self._queue_size:
            self._update_state()

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer, the replayer (which drains any spool left from before) and
        the partition keeper."""
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="usage-ledger-writer"),
            asyncio.create_task(self._replay_loop(), name="usage-ledger-replayer"),
            asyncio.create_task(self._partition_loop(), name="usage-ledger-partitions"),
        ]
        self._replay.set()

    async def flush(self) -> None:
        """Wait until every record submitted so far is in Postgres or in the spool."""
        target = self._submitted
        if self._settled >= target:
            return
        future = asyncio.get_running_loop().create_future()
        self._settle_waiters.append((target, future))
        await future

    async def wait_stored(self) -> None:
        """Wait until everything submitted so far is in Postgres: queue and spool empty."""
        while True:
            await self.flush()
            if not self._queue and self._spool.records == 0 and self._postgres_ok:
                return
            future = asyncio.get_running_loop().create_future()
            self._stored_waiters.append(future)
            await future

    async def close(self) -> None:
        """Write or spool what is queued (past the spool's limit if need be: at shutdown,
        disk beats losing rows), store the spool if Postgres answers (bounded), then stop.
        A spool left behind is replayed at next start."""
        self._closing = True
        self._room.set()
        with contextlib.suppress(Exception):
            await self.flush()
        await stop_tasks(*self._tasks)
        self._tasks = []
        # Writes still pending on a stuck Postgres: their rows are in the spool already.
        for late in self._late_writes:
            late.cancel()
        if self._late_writes:
            await asyncio.wait(self._late_writes, timeout=1.0)
        if self._spool.records:
            await self._drain_before_exit()
        if self._spool.records:
            log.warning(
                "usage ledger stopped with %d record(s) in the spool %s; they are replayed at next start",
                self._spool.records,
                self._spool.directory,
            )

    async def _drain_before_exit(self) -> None:
        """Rows spooled while Postgres was slow or away: if it answers now, store them
        before the process exits instead of leaving them for the next start, which may
        be far off (a replica scaled down never starts again on that volume). Bounded by
        the write timeout: with Postgres still away it costs one probe."""
        try:
            async with asyncio.timeout(self._write_timeout_s):
                await self._replay_once()
        except Exception as exc:  # noqa: BLE001 - the spool stays on disk either way
            log.info("usage ledger: spool not drained at exit (%s)", type(exc).__name__)

    # --- state -------------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[LedgerState], None]) -> None:
        """Call ``listener(state)`` on every state change (synchronously; keep it short)."""
        self._listeners.append(listener)

    @property
    def state(self) -> LedgerState:
        return self._state

    @property
    def depth(self) -> int:
        return len(self._queue)

    def stats(self) -> LedgerStats:
        return LedgerStats(
            state=self._state,
            postgres_ok=self._postgres_ok,
            queued=len(self._queue),
            spooled_records=self._spool.records,
            spool_bytes=self._spool.size,
            written=self._written,
            spooled=self._spooled,
            replayed=self._replayed,
            dead_lettered=self._dead,
            lost=self._lost,
        )

    def _spool_has_room(self) -> bool:
        return not self._spool_broken and (self._closing or not self._spool.full)

    def _update_state(self) -> None:
        if len(self._queue) >= self._queue_size and not self._spool_has_room():
            state = LedgerState.FULL
        elif not self._postgres_ok or self._spool.records:
            state = LedgerState.SPOOLING
        else:
            state = LedgerState.OK
        if state is not self._state:
            old, self._state = self._state, state
            (log.info if state is LedgerState.OK else log.warning)(
                "usage ledger: %s → %s (queued %d, spooled %d)",
                old.name,
                state.name,
                len(self._queue),
                self._spool.records,
            )
            for listener in self._listeners:
                try:
                    listener(state)
                except Exception:
                    log.exception("usage ledger state listener failed")
        if state is LedgerState.OK and not self._queue and self._stored_waiters:
            waiters, self._stored_waiters = self._stored_waiters, []
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    def _settle(self, count: int) -> None:
        self._settled += count
        if self._settle_waiters:
            still = []
            for target, future in self._settle_waiters:
                if self._settled >= target:
                    if not future.done():
                        future.set_result(None)
                else:
                    still.append((target, future))
            self._settle_waiters = still
        self._update_state()

    def _postgres_lost(self, exc: BaseException) -> None:
        if self._postgres_ok:
            log.warning(
                "usage ledger: Postgres unavailable (%s); spooling usage records to %s",
                describe(exc),
                self._spool.directory,
            )
        self._postgres_ok = False
        self._replay.set()
        self._update_state()

    def _postgres_back(self) -> None:
        if not self._postgres_ok:
            log.info("usage ledger: Postgres answers again; writing directly")
        self._postgres_ok = True
        self._room.set()
        self._update_state()

    # --- the writer ----------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                self._work.clear()
                await self._work.wait()
                continue
            if len(self._queue) < self._batch_size and self._postgres_ok and not self._closing:
                # Let a batch gather for a moment: under steady load this turns a
                # transaction (and a WAL flush) per few rows into one per ~linger_s.
                await asyncio.sleep(self._linger_s)
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            try:
                await self._write(batch)
            except Exception:
                # Never let the writer die: keep the batch and try again shortly.
                log.exception("usage ledger writer: unexpected error; retrying")
                self._queue.extendleft(reversed(batch))
                await asyncio.sleep(self._retry_base_s)

    async def _write(self, batch: list[UsageRecord]) -> None:
        if not self._postgres_ok:
            await self._to_spool(batch)
            return
        write = asyncio.create_task(self._write_records(batch), name="usage-ledger-insert")
        if not await self._answered_in_time(write):
            # Postgres took the write and does not answer. Memory is where a crash loses
            # rows: put them on disk now and let the write go on (or time out) alone.
            self._late_writes.add(write)
            write.add_done_callback(self._late_write_done)
            self._postgres_lost(WriteStuck(f"a write unanswered for {self._spool_after_s:g}s"))
            await self._to_spool(batch)
            return
        left, exc = write.result()
        self._settle(len(batch) - len(left))
        if exc is not None:
            self._postgres_lost(exc)
            await self._to_spool(left)

    async def _answered_in_time(self, write: asyncio.Task[_Stored]) -> bool:
        """Wait for ``write``; False once Postgres has been silent for ``spool_after_s``
        with a connection in hand (or ``_CONNECT_ALLOWANCE_S`` more without one). Silent,
        not slow: a batch split around a bad record takes several round trips, each
        answered, and is not stuck; nor is the first connection on a loaded host."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not write.done():
            if self._connected_at < started:  # still waiting for a connection
                quiet_until = started + _CONNECT_ALLOWANCE_S + self._spool_after_s
            else:
                quiet_until = max(self._connected_at, self._answered_at) + self._spool_after_s
            if loop.time() >= quiet_until:
                return False
            # In slices: a connection or an answer arriving meanwhile moves the deadline.
            slice_s = min(quiet_until - loop.time(), self._spool_after_s / 4)
            await asyncio.wait({write}, timeout=slice_s)
        return True

    def _connected(self) -> None:
        self._connected_at = asyncio.get_running_loop().time()

    def _late_write_done(self, write: asyncio.Task[_Stored]) -> None:
        """A write that outlived ``spool_after_s`` ended; its rows are in the spool."""
        self._late_writes.discard(write)
        if write.cancelled() or write.exception() is not None:
            return
        if write.result()[1] is None:
            # It landed after all: Postgres answers (the spooled copy replays as a no-op).
            self._postgres_back()
            self._replay.set()

    async def _write_records(self, records: Sequence[UsageRecord]) -> _Stored:
        """Insert ``records``, splitting a batch Postgres refuses in halves until each bad
        record is alone and dead-lettered. Returns the records left unwritten because
        Postgres went away meanwhile (not dead-lettered: they are not bad), and why."""
        try:
            self._written += await self._insert(records)
            return [], None
        except Exception as exc:  # noqa: BLE001 - sorted by is_bad_record
            if not is_bad_record(exc):
                return list(records), exc
            if len(records) == 1:
                await self._dead_letter(records[0], exc)
                return [], None
        middle = len(records) // 2
        left, away = await self._write_records(records[:middle])
        if away is not None:
            return left + list(records[middle:]), away
        return await self._write_records(records[middle:])

    async def _to_spool(self, batch: list[UsageRecord]) -> None:
        """Append to the spool; when it has no room, hold the batch and wait for some."""
        if self._spool_has_room():
            try:
                await asyncio.to_thread(self._spool.append, batch, over_limit=self._closing)
            except SpoolFull:
                pass
            except OSError as exc:
                log.error("usage ledger: cannot write the spool %s (%s)", self._spool.directory, exc)
                self._spool_broken = True
            else:
                self._spooled += len(batch)
                self._replay.set()
                self._settle(len(batch))
                return
        if self._closing:
            self._lose(batch)
            return
        # Neither Postgres nor disk takes it now: keep it (queue front) and wait until
        # Postgres is back or the spool has room. Admission refuses calls meanwhile.
        self._queue.extendleft(reversed(batch))
        self._update_state()
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._retry_cap_s):
                await self._room.wait()
        # A broken disk may have recovered (space freed): the next batch tries it again.
        self._spool_broken = False

    def _lose(self, batch: Sequence[UsageRecord]) -> None:
        self._lost += len(batch)
        log.error(
            "usage ledger: %d usage record(s) LOST at shutdown: Postgres unreachable and the spool "
            "unwritable (first request id %s)",
            len(batch),
            batch[0].request_id if batch else "-",
        )
        self._settle(len(batch))

    async def _insert(self, records: Sequence[UsageRecord]) -> int:
        # One span per batch, in its own trace, linked to the calls whose rows it writes:
        # from a request's trace one can find the write that billed it, and back.
        with self._tracer.start_as_current_span(
            "usage.write",
            kind=trace.SpanKind.CLIENT,
            links=_links(records),
            attributes={
                "db.system.name": "postgresql",
                "db.operation.name": "INSERT",
                "chatgate.usage.rows": len(records),
            },
        ) as span:
            inserted = await self._insert_once_or_twice(records)
            span.set_attribute("chatgate.usage.inserted", inserted)
            return inserted

    async def _insert_once_or_twice(self, records: Sequence[UsageRecord]) -> int:
        try:
            return await self._insert_answered(records)
        except psycopg.errors.TransactionRollback:
            # A deadlock with another writer settling the same roll-up rows (replicas, the
            # replayer): Postgres rolled one back; run it again rather than call it an outage.
            return await self._insert_answered(records)

    async def _insert_answered(self, records: Sequence[UsageRecord]) -> int:
        """One insert within the write timeout, noting when Postgres answered it."""
        try:
            async with asyncio.timeout(self._write_timeout_s):
                inserted = await self._store.insert(records, self._connected)
        except psycopg.Error as exc:
            if exc.sqlstate:  # refused by a server that answers
                self._answered_at = asyncio.get_running_loop().time()
            raise
        self._answered_at = asyncio.get_running_loop().time()
        return inserted

    async def _dead_letter(self, record: UsageRecord, exc: BaseException) -> None:
        key = (record.request_id, record.started_at)
        if key in self._dead_keys:
            # The same row refused again: a stuck write that landed late and the replay of
            # its spooled copy both split the batch. One letter is enough.
            return
        if len(self._dead_keys) >= _DEAD_KEYS_KEPT:
            self._dead_keys.clear()
        self._dead_keys.add(key)
        self._dead += 1
        reason = describe(exc)
        try:
            path = await asyncio.to_thread(self._spool.dead_letter, [record], reason)
        except Exception as err:  # noqa: BLE001 - a dead letter must never stop the writer
            self._lost += 1
            log.error("usage record %s refused by Postgres (%s) and LOST: %s", record.request_id, reason, err)
            return
        log.error(
            "usage record %s refused by Postgres (%s); kept in %s, retry with "
            "`chatgate usage-dead-letters replay`",
            record.request_id,
            reason,
            path,
        )

    # --- the replayer ----------------------------------------------------------------------------

    async def _replay_loop(self) -> None:
        delay = self._retry_base_s
        while True:
            if self._postgres_ok and not self._spool.records:
                self._replay.clear()
                self._update_state()
                await self._replay.wait()
                continue
            try:
                await self._replay_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, psycopg.Error | TimeoutError):
                    self._postgres_lost(exc)
                else:
                    log.exception("usage ledger replayer: unexpected error; retrying")
                # Full jitter: replicas that lost Postgres together don't return together.
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._retry_cap_s)
            else:
                delay = self._retry_base_s

    async def _replay_once(self) -> None:
        if not self._postgres_ok or not self._spool.records:
            # A cheap probe first: no segment is read (or sealed) while Postgres is away.
            async with asyncio.timeout(self._write_timeout_s):
                await self._store.ping()
            self._postgres_back()
        for segment in await asyncio.to_thread(self._spool.seal):
            await self._replay_segment(segment)

    async def _replay_segment(self, segment: Segment) -> None:
        records = await asyncio.to_thread(self._spool.read, segment)
        for start in range(0, len(records), self._batch_size):
            chunk = records[start : start + self._batch_size]
            _, exc = await self._write_records(chunk)  # a bad record is dead-lettered, not retried
            if exc is not None:
                raise exc
            self._replayed += len(chunk)
            self._postgres_back()
        await asyncio.to_thread(self._spool.remove, segment)
        log.info("usage ledger: replayed %d spooled record(s) from %s", len(records), segment.path.name)
        self._room.set()
        self._update_state()

    # --- partitions ---------------------------------------------------------------------------

    async def _partition_loop(self) -> None:
        """Next months' partitions, at start and then every interval (a replica that runs
        for months must keep creating them); retried sooner while Postgres is away."""
        while True:
            try:
                async with asyncio.timeout(max(self._write_timeout_s, 30.0)):
                    created = await self._store.ensure_partitions()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried; the default partition catches rows
                log.warning("usage ledger: could not ensure partitions (%s); retrying", type(exc).__name__)
                await asyncio.sleep(min(60.0, self._partition_interval_s))
                continue
            if created:
                log.info("usage ledger: created %d monthly partition(s)", created)
            await asyncio.sleep(self._partition_interval_s)
