"""The lease engine: this process's accounts on the shared counters, kept topped up.

Admission calls :meth:`Leaser.take` (arithmetic, no I/O). When an account runs low
the engine syncs it in the background — one statement (counters.py) — so admission
rarely waits; it waits (once, bounded by ``wait_s``) only when the account cannot cover
a call and the database may still have something to give. A background loop renews
leases before they expire, reports what was spent, gives back what sits unused, and
once a second says the process is alive (which also reclaims the leases of processes
that stopped: killed, or cut off).

While Postgres is away (the last statement failed), accounts keep admitting against
what they hold, and beyond it each process admits its share: the limit ÷ the live
processes it last counted — never unlimited, never nothing. Spending made meanwhile is
reported at the first sync that succeeds (docs/LIMITS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from chatgate_server.background import stop_tasks
from chatgate_server.domain import LimitKind
from chatgate_server.limits.buckets import BucketAccount
from chatgate_server.limits.counters import CounterStore
from chatgate_server.limits.definitions import RATE_KINDS, Limit, window
from chatgate_server.limits.leases import PoolAccount

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineTuning:
    horizon_s: float = 10.0
    """A budget's slice covers about this much of the recent demand (less as the
    budget nears its end): a busy account syncs about every horizon_s / 2."""
    bucket_horizon_s: float = 4.0
    """A rate's slice covers about this much of the recent demand: shorter, since
    tokens held are tokens taken from the bucket ahead of their use."""
    idle_s: float = 2.0
    """An account unused this long gives back what it holds."""
    wait_s: float = 0.5
    """The longest admission waits for a sync (only when the account cannot cover a call)."""
    tick_s: float = 1.0
    """How often the background loop looks for accounts to renew or give back (an
    account running low is synced at once, by the take that found it low)."""
    heartbeat_s: float = 1.0
    db_timeout_s: float = 2.0
    """Longest one statement may take before Postgres counts as away."""
    retry_s: float = 1.0
    """After a failed sync, an account is not synced again for this long."""
    recheck_s: float = 1.0
    """A counter seen empty is asked again after this long (not for every refused call)."""


@dataclass(slots=True, eq=False)
class Entry:
    """One account and where its counter lives."""

    limit: Limit
    name: str
    ends_at: datetime | None
    account: PoolAccount | BucketAccount
    syncing: asyncio.Task[None] | None = None
    failed_at: float = field(default=-1e9)
    synced_at: float = field(default=-1e9)


class Leaser:
    def __init__(
        self,
        store: CounterStore,
        *,
        tuning: EngineTuning = EngineTuning(),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self.tuning = tuning
        self._clock = clock
        self._wall = wall
        self._entries: dict[str, Entry] = {}
        # The entry of each limit's current window, by the limit's key (no window).
        self._current: dict[str, Entry] = {}
        self.live = 1
        """Live processes at the last heartbeat (this one included)."""
        self.away = False
        """The last statement failed: Postgres counts as away."""
        self._task: asyncio.Task[None] | None = None

    @property
    def statements(self) -> int:
        return self._store.statements

    # --- the hot path -------------------------------------------------------------

    def entry(self, limit: Limit, wall: datetime) -> Entry:
        """The account for ``limit`` in the window ``wall`` falls in (made on first use)."""
        found = self._current.get(limit.key)
        if found is not None and (found.ends_at is None or wall < found.ends_at) and found.limit is limit:
            return found  # the hot path: the same limit object, in the same window
        win = window(limit.kind, wall)
        name = limit.key if limit.kind in RATE_KINDS else f"{limit.key}@{win.name}"
        found = self._entries.get(name)
        if found is None:
            now = self._clock()
            account: PoolAccount | BucketAccount
            if limit.kind in RATE_KINDS:
                account = BucketAccount(limit.amount, now=now)
            else:
                reusable = limit.kind is LimitKind.CONCURRENT_STREAMS
                account = PoolAccount(limit.amount, ttl_s=self._store.ttl_s, now=now, reusable=reusable)
            found = self._entries[name] = Entry(limit, name, win.ends_at, account)
        else:
            found.limit = limit  # a reload made a new object (maybe a new amount)
            found.account.amount = limit.amount
        self._current[limit.key] = found
        return found

    def take(self, entry: Entry, n: int, now: float | None = None) -> bool:
        """Reserve ``n`` on the account, locally; kicks a background sync when low."""
        if now is None:
            now = self._clock()
        account = entry.account
        if not self.away:
            ok = account.take(n, now)
        elif isinstance(account, BucketAccount):
            ok = account.take(n, now, live=self.live)
        else:
            ok = account.take(n, now, share=account.amount // max(self.live, 1))
        if ok and entry.syncing is None and account.worth_syncing(now, idle_s=self.tuning.idle_s):
            self._start_sync(entry)
        return ok

    async def acquire(self, entry: Entry, n: int, deadline: float | None = None) -> bool:
        """Reserve ``n``, waiting (until ``deadline``, by default ``wait_s`` from now) for
        syncs when the account cannot cover it and the counter may still have it; False:
        refused. Cancelled while waiting, it has reserved nothing (the take follows the
        wait with no await between)."""
        if self.take(entry, n):
            return True
        account = entry.account
        if deadline is None:
            deadline = self._clock() + self.tuning.wait_s
        while not self.away and not self._exhausted(entry, n):
            account.pending += n
            try:
                if entry.syncing is None:
                    self._start_sync(entry)
                task = entry.syncing
                if task is None:  # backing off after a failed sync
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), max(deadline - self._clock(), 0.001))
            finally:
                account.pending -= n
            if self.take(entry, n):
                return True
            if self._clock() >= deadline:
                return False
        return False

    def _exhausted(self, entry: Entry, n: int) -> bool:
        """The counter, as seen less than ``recheck_s`` ago, could not cover ``n``
        beyond what this process holds: waiting for a sync would not help. (Seen
        longer ago, it may have changed: others gave back, a dead lease was reclaimed.)"""
        account, now = entry.account, self._clock()
        if now - entry.synced_at >= self.tuning.recheck_s:
            return False
        if isinstance(account, BucketAccount):
            return account.level_now(now) + max(account.held, 0) < n
        return account.remaining + max(account.available(now), 0) < n

    # --- syncs ---------------------------------------------------------------------

    def _start_sync(self, entry: Entry) -> None:
        if self._clock() - entry.failed_at < self.tuning.retry_s:
            return
        entry.syncing = asyncio.get_running_loop().create_task(self._sync(entry), name="limit-sync")

    async def _sync(self, entry: Entry) -> None:
        try:
            await self._sync_once(entry)
        except Exception as exc:  # noqa: BLE001 - Postgres away or slow: go on locally
            entry.failed_at = self._clock()
            if not self.away:
                log.warning(
                    "limits: cannot reach Postgres (%s); admitting against held slices,"
                    " then %d%% of each limit",
                    type(exc).__name__,
                    100 // max(self.live, 1),
                )
            self.away = True
        else:
            entry.synced_at = self._clock()
            if self.away:
                log.info("limits: Postgres answers again; leases reconciled as accounts sync")
            self.away = False
        finally:
            entry.syncing = None

    async def _sync_once(self, entry: Entry) -> None:
        account, t = entry.account, self.tuning
        started = self._clock()
        if isinstance(account, BucketAccount):
            take = account.plan(started, live=self.live, horizon_s=t.bucket_horizon_s, idle_s=t.idle_s)
            if take.want == 0 and take.back == 0:
                return
            try:
                async with asyncio.timeout(t.db_timeout_s):
                    granted, level = await self._store.bucket_take(
                        entry.name, account.capacity, account.per_s, take
                    )
            except BaseException:
                account.failed(take)
                raise
            account.applied(take, granted, level, self._clock())
            account.reconnected()
            return
        sync = account.plan(started, live=self.live, horizon_s=t.horizon_s, idle_s=t.idle_s)
        renew = account.held > 0 and started >= account.lease_until - account.ttl_s / 2
        if sync.spent == 0 and sync.back == 0 and sync.want == 0 and not renew:
            return
        try:
            async with asyncio.timeout(t.db_timeout_s):
                grant = await self._store.pool_sync(entry.name, entry.ends_at, account.amount, sync)
        except BaseException:
            account.failed(sync)
            raise
        account.applied(sync, grant, started)

    # --- the background loop ------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="limit-leases")

    async def _run(self) -> None:
        next_beat = 0.0
        while True:
            now = self._clock()
            if now >= next_beat:
                next_beat = now + self.tuning.heartbeat_s
                await self._heartbeat()
            self.tend(now)
            await asyncio.sleep(self.tuning.tick_s)

    async def _heartbeat(self) -> None:
        try:
            async with asyncio.timeout(self.tuning.db_timeout_s):
                self.live = await self._store.heartbeat(max(3 * self.tuning.heartbeat_s, self._store.ttl_s))
        except Exception:  # noqa: BLE001 - syncs say when Postgres is away
            return
        if self.away:  # Postgres answers again: calls may wait for syncs again
            log.info("limits: Postgres answers again; leases reconciled as accounts sync")
            self.away = False

    def tend(self, now: float) -> None:
        """Start the syncs that are due; forget accounts with nothing in them."""
        idle = self.tuning.idle_s
        for name, entry in list(self._entries.items()):
            if entry.syncing is not None:
                continue
            if entry.account.worth_syncing(now, idle_s=idle):
                self._start_sync(entry)
            elif entry.account.idle(now, 30 * idle):
                del self._entries[name]
                if self._current.get(entry.limit.key) is entry:
                    del self._current[entry.limit.key]

    async def stop(self) -> None:
        """Stop the loop and give back everything held (bounded by the sync timeout)."""
        await stop_tasks(self._task)
        self._task = None
        pending = [e.syncing for e in self._entries.values() if e.syncing is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for entry in self._entries.values():
            entry.account.last_take = -1e9  # idle: the next plan gives everything back
        await asyncio.gather(*(self._sync(e) for e in self._entries.values()), return_exceptions=True)
        try:
            async with asyncio.timeout(self.tuning.db_timeout_s):
                await self._store.leave()
        except Exception:  # noqa: BLE001 - counted as live until its heartbeat ages out
            log.debug("limits: could not say goodbye")
