"""Caller-supplied request ids, reserved in Postgres where every process sees them.

With ``--workers N`` (or several replicas) each process's memory knows only its own
calls, and a call's usage row reaches Postgres only after the call (and the ledger's
batch linger): two processes given the same id at the same moment both admitted it.
:meth:`ReservationStore.claim` settles it with the primary key of
``request_id_reservations`` (migration 0004) — one statement, one round trip:

- ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` takes the id when it is free, when its
  reservation expired (older than ``CHATGATE_REQUEST_ID_WINDOW_HOURS``: cleanup on
  insert), or when it was *released* by an attempt that sent the caller nothing and the
  content is the same (the caller's retry); otherwise it changes nothing and returns
  nothing, and the caller is refused;
- the same statement reads the reservation that stood (to say "different request") and,
  when the id was won, the id's usage rows within the window (rows written while
  reservations could not be: before this migration, or while Postgres was away).

Why cheap: one statement (for all the claims made meanwhile, see
:class:`ReservationStore`) on a pool of autocommit connections (no BEGIN/COMMIT round
trips) with ``synchronous_commit=off`` (no WAL flush wait: a Postgres crash can forget
the reservations of the last fraction of a second, which reopens only those ids, and
only until their rows are written). Generated ids never come here.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

from psycopg import AsyncConnection
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from chatgate_server.usage.store import StoredAttempt

Pool = AsyncConnectionPool[AsyncConnection[Any]]

# Connection settings for the reservation pool (psycopg ``kwargs``, and ``configure``
# for each new connection): see the docstring.
POOL_KWARGS: Final[dict[str, Any]] = {"autocommit": True}


async def configure(conn: AsyncConnection[Any]) -> None:
    """Session settings of a reservation connection. SET rather than startup
    ``options``, which connection poolers such as PgBouncer refuse. statement_timeout
    backs up the caller's own (shorter) asyncio timeout on the server's side."""
    await conn.execute("SET synchronous_commit = off")
    await conn.execute("SET statement_timeout = 2000")


# Many ids per statement (one per call admitted meanwhile, all distinct: a process never
# claims an id it already has in flight). Rows are claimed in id order, so two
# processes' batches that share ids wait for each other instead of deadlocking.
# `before` and the holder it yields read the statement's snapshot: a reservation
# committed by another process while this statement waited for it shows as no holder.
# Both lookups filter on the id array itself (= ANY): joined to a CTE instead, the
# planner may scan whole tables — every claim would grow slower as reservations accumulated.
_CLAIM: Final = b"""
WITH wanted AS (
    SELECT * FROM unnest(%(ids)s::text[], %(fps)s::bytea[]) AS w(request_id, fingerprint)
), before AS (
    SELECT request_id, fingerprint FROM request_id_reservations WHERE request_id = ANY(%(ids)s::text[])
), claimed AS (
    INSERT INTO request_id_reservations AS r (request_id, fingerprint)
    SELECT request_id, fingerprint FROM wanted ORDER BY request_id
    ON CONFLICT (request_id) DO UPDATE
        SET fingerprint = excluded.fingerprint, reserved_at = now(), released = false
        WHERE r.reserved_at < now() - %(window)s
           OR (r.released AND r.fingerprint = excluded.fingerprint)
    RETURNING r.request_id
), stored AS (
    SELECT request_id, array_agg(started_at) AS started, array_agg(request_fingerprint) AS fps,
           array_agg(resolved_model IS NOT NULL) AS served
    FROM usage_records
    WHERE request_id = ANY(%(ids)s::text[]) AND started_at >= now() - %(window)s
      AND request_id IN (SELECT request_id FROM claimed)
    GROUP BY request_id
)
SELECT w.request_id, c.request_id IS NOT NULL, b.fingerprint, s.started, s.fps, s.served
FROM wanted w
LEFT JOIN claimed c USING (request_id)
LEFT JOIN before b USING (request_id)
LEFT JOIN stored s USING (request_id)
"""

# Only the reservation its caller made: a later owner of the id is left alone.
_RELEASE: Final = (
    b"UPDATE request_id_reservations SET released = true"
    b" WHERE request_id = %s AND fingerprint = %s AND NOT released"
)
_FORGET: Final = b"DELETE FROM request_id_reservations WHERE request_id = %s AND fingerprint = %s"
_EXPIRE: Final = b"DELETE FROM request_id_reservations WHERE reserved_at < now() - %s"
_COUNT_EXPIRED: Final = b"SELECT count(*) FROM request_id_reservations WHERE reserved_at < now() - %s"


@dataclass(frozen=True, slots=True)
class Claim:
    """What :meth:`ReservationStore.claim` found."""

    won: bool
    holder: str | None = None
    """When not won: the fingerprint of the reservation that stands (None when it was
    committed while the claim ran: a concurrent call)."""
    stored: list[StoredAttempt] = field(default_factory=list)
    """When won: the id's usage rows within the window."""


def _hex(value: bytes | None) -> str | None:
    return None if value is None else bytes(value).hex()


class ReservationStore:
    """Request-id reservations through a pool the caller owns (``POOL_KWARGS`` and
    :func:`configure`).

    Claims made while a claim statement is running wait and go together in the next
    one: a burst of calls costs a few round trips, not one per call on a few
    connections (a burst of 200 ids took seconds that way on a loaded host, past any
    reasonable timeout). Idle, a claim goes at once: no linger is added.
    """

    def __init__(self, pool: Pool, *, window: timedelta) -> None:
        self._pool = pool
        self._window = window
        self._waiting: dict[str, tuple[bytes, asyncio.Future[Claim]]] = {}
        self._sender: asyncio.Task[None] | None = None

    async def claim(self, request_id: str, fingerprint: str) -> Claim:
        """Reserve ``request_id`` for a request with ``fingerprint`` (hex), if it is free.

        Should the caller stop waiting (its timeout), an id won for it is given back.
        """
        if request_id in self._waiting:
            raise ValueError(f"request id {request_id!r} is already being claimed")
        future: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (bytes.fromhex(fingerprint), future)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="request-id-claims")
        return await future

    async def _send(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                try:
                    claims = await self._claim_many(batch)
                except Exception as exc:  # noqa: BLE001 - every waiter gets it
                    for _, future in batch.values():
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for request_id, (fp, future) in batch.items():
                    claim = claims[request_id]
                    if not future.done():
                        future.set_result(claim)
                    elif claim.won:  # its caller gave up waiting and runs unreserved
                        with contextlib.suppress(Exception):
                            await self.forget(request_id, fp.hex())
        finally:
            self._sender = None

    async def _claim_many(self, batch: dict[str, tuple[bytes, asyncio.Future[Claim]]]) -> dict[str, Claim]:
        params = {"ids": list(batch), "fps": [fp for fp, _ in batch.values()], "window": self._window}
        async with self._pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(_CLAIM, params)
            rows = await cur.fetchall()
        claims: dict[str, Claim] = {}
        for request_id, won, holder, started, fps, served in rows:
            if not won:
                claims[request_id] = Claim(False, _hex(holder))
                continue
            attempts = zip(started or (), fps or (), served or (), strict=True)
            claims[request_id] = Claim(
                True, stored=[StoredAttempt(t, _hex(f), bool(x)) for t, f, x in attempts]
            )
        return claims

    async def release(self, request_id: str, fingerprint: str) -> None:
        """The call that reserved the id sent the caller nothing: a retry may take it over."""
        async with self._pool.connection() as conn:
            await conn.execute(_RELEASE, [request_id, bytes.fromhex(fingerprint)])

    async def forget(self, request_id: str, fingerprint: str) -> None:
        """Drop a reservation whose call was refused after all (its usage rows said so)."""
        async with self._pool.connection() as conn:
            await conn.execute(_FORGET, [request_id, bytes.fromhex(fingerprint)])


async def delete_expired(conn: AsyncConnection[Any], window: timedelta) -> int:
    """Delete reservations older than ``window``; returns how many went."""
    async with conn.cursor() as cur:
        await cur.execute(_EXPIRE, [window])
        return cur.rowcount


async def count_expired(conn: AsyncConnection[Any], window: timedelta) -> int:
    """How many reservations :func:`delete_expired` would delete."""
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(_COUNT_EXPIRED, [window])
        row = await cur.fetchone()
    return 0 if row is None else int(row[0])
