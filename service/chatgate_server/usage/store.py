"""The SQL side of the ledger: write batches of usage rows, keep the daily roll-up.

One batch is one statement, hence one transaction: the records go in as one array per
column (``unnest``), rows that already exist are skipped (``ON CONFLICT DO NOTHING``),
and only the rows actually inserted feed the ``usage_daily`` upsert through a CTE. So
a replayed batch (the ledger's spool after an outage) inserts nothing and counts
nothing twice, and a crash between rows and roll-up cannot happen.

Arrays rather than a multi-row ``VALUES``: the statement text and its parameter count
are the same for every batch size, so the server can reuse one prepared plan, and
large batches never approach the 65535-parameter limit.

Caller-supplied request ids (records with a ``request_fingerprint``) take a second
step in the same transaction: an earlier attempt of the same id that sent the caller
nothing is superseded — its row deleted and taken back out of ``usage_daily`` — so the
id keeps one row (:func:`settle_attempts`; why, in ``usage/admission.py``). Generated
ids skip it: they are unique by construction, and their batches stay one statement.

Lock order: concurrent writers (two replicas, or a replay racing a live batch) insert
rows in primary-key order and upsert roll-up rows in roll-up-key order, so two
transactions touching the same keys wait for each other instead of deadlocking.

Every string is cut to a documented size and made storable first (:mod:`.fields`), so
a caller's value cannot exceed an index's row limit. Errors propagate as psycopg
exceptions; :func:`chatgate_server.usage.errors.is_bad_record` tells a row the schema
refuses (retrying the same batch cannot succeed) from Postgres being away.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, LiteralString

import orjson
from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool

from chatgate_server.domain import UsageRecord
from chatgate_server.usage import fields, partitions

Pool = AsyncConnectionPool[AsyncConnection[Any]]


def _tags(tags: Mapping[str, str]) -> str:
    if not tags:
        return "{}"
    # orjson: a few times faster than json on the writer's per-row path (jsonb keeps no
    # formatting, so the text differs from json.dumps's in nothing that is stored).
    return orjson.dumps(fields.tags(tags), option=orjson.OPT_SORT_KEYS).decode()


def request_key(request_id: str) -> str:
    """``request_id`` as stored (cut to its documented size, see :mod:`.fields`)."""
    return fields.text(request_id, fields.REQUEST_ID_BYTES)


def _fingerprint(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)


def _started_at(record: UsageRecord) -> object:
    # The partition key and half the primary key: a naive datetime would be read in
    # the session's time zone, and a replay from another zone would not deduplicate.
    if record.started_at.utcoffset() is None:
        raise ValueError(f"usage record {record.request_id!r}: started_at must be timezone-aware")
    return record.started_at


@dataclass(frozen=True, slots=True)
class _Column:
    name: LiteralString
    array_type: LiteralString
    value: Callable[[UsageRecord], object]


# The one place where UsageRecord fields meet columns.
_COLUMNS: tuple[_Column, ...] = (
    _Column("request_id", "text[]", lambda r: request_key(r.request_id)),
    _Column("started_at", "timestamptz[]", _started_at),
    _Column("tenant", "text[]", lambda r: fields.text(r.tenant, fields.TENANT_BYTES)),
    _Column("caller_service", "text[]", lambda r: fields.text(r.caller_service, fields.TENANT_BYTES)),
    _Column("credential_id", "text[]", lambda r: fields.opt_text(r.credential_id, fields.CODE_BYTES)),
    _Column("deployment", "text[]", lambda r: fields.opt_text(r.deployment, fields.CODE_BYTES)),
    _Column("fallback_model", "text[]", lambda r: fields.opt_text(r.fallback_model, fields.MODEL_BYTES)),
    _Column("user_id", "text[]", lambda r: fields.text(r.user_id, fields.USER_ID_BYTES)),
    _Column("requested_model", "text[]", lambda r: fields.text(r.requested_model, fields.MODEL_BYTES)),
    _Column("resolved_model", "text[]", lambda r: fields.opt_text(r.resolved_model, fields.MODEL_BYTES)),
    _Column(
        "upstream_response_id",
        "text[]",
        lambda r: fields.opt_text(r.upstream_response_id, fields.RESPONSE_ID_BYTES),
    ),
    _Column("input_tokens", "bigint[]", lambda r: r.usage.input_tokens),
    _Column("output_tokens", "bigint[]", lambda r: r.usage.output_tokens),
    _Column("cached_input_tokens", "bigint[]", lambda r: r.usage.cached_input_tokens),
    _Column("reasoning_tokens", "bigint[]", lambda r: r.usage.reasoning_tokens),
    _Column("total_tokens", "bigint[]", lambda r: r.usage.total_tokens),
    _Column("cost_usd_micros", "bigint[]", lambda r: r.cost.usd_micros),
    _Column("usage_source", "text[]", lambda r: fields.text(r.usage.source, fields.CODE_BYTES)),
    _Column(
        "estimate_encoding", "text[]", lambda r: fields.opt_text(r.usage.estimate_encoding, fields.CODE_BYTES)
    ),
    _Column("price_version", "text[]", lambda r: fields.text(r.cost.price_version, fields.CODE_BYTES)),
    _Column("cost_basis", "text[]", lambda r: r.cost.basis.value if r.cost.basis else None),
    _Column("outcome", "text[]", lambda r: r.outcome.value),
    _Column("grpc_status", "text[]", lambda r: fields.text(r.grpc_status, fields.CODE_BYTES)),
    _Column("finish_reason", "text[]", lambda r: fields.opt_text(r.finish_reason, fields.CODE_BYTES)),
    _Column("attempts", "integer[]", lambda r: r.attempts),
    _Column("ttft_ms", "float8[]", lambda r: r.time_to_first_token_ms),
    _Column("duration_ms", "float8[]", lambda r: r.duration_ms),
    _Column("trace_id", "text[]", lambda r: fields.opt_text(r.trace_id, fields.CODE_BYTES)),
    _Column("tags", "jsonb[]", lambda r: _tags(r.tags)),
    _Column("request_fingerprint", "bytea[]", lambda r: _fingerprint(r.request_fingerprint)),
    _Column("service_tier", "text[]", lambda r: fields.opt_text(r.service_tier, fields.CODE_BYTES)),
)

# The token and cost columns summed into usage_daily.
_SUMMED: tuple[LiteralString, ...] = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd_micros",
)


def _insert_statement() -> sql.Composed:
    names = sql.SQL(", ").join(sql.Identifier(c.name) for c in _COLUMNS)
    # Binary parameters (%b): a quarter of the client CPU of text arrays, and Postgres
    # parses them faster too (bench/ledger.py).
    arrays = sql.SQL(", ").join(sql.SQL("%b::" + c.array_type) for c in _COLUMNS)
    summed = sql.SQL(", ").join(sql.Identifier(c) for c in _SUMMED)
    sums = sql.SQL(", ").join(
        sql.SQL("coalesce(sum({c}), 0)::bigint AS {c}").format(c=sql.Identifier(c)) for c in _SUMMED
    )
    adds = sql.SQL(", ").join(
        sql.SQL("{c} = d.{c} + excluded.{c}").format(c=sql.Identifier(c)) for c in _SUMMED
    )
    return sql.SQL(
        """
        WITH batch AS (
            SELECT * FROM unnest({arrays}) AS b({names})
        ), inserted AS (
            INSERT INTO usage_records ({names})
            SELECT {names} FROM batch
            ORDER BY request_id, started_at
            ON CONFLICT DO NOTHING
            RETURNING started_at, tenant, user_id, requested_model, {summed}
        ), daily AS (
            SELECT (started_at AT TIME ZONE 'UTC')::date AS day, tenant, user_id,
                   requested_model AS model, count(*) AS requests,
                   count(*) FILTER (WHERE cost_usd_micros IS NULL) AS unpriced_requests,
                   {sums}
            FROM inserted
            GROUP BY 1, 2, 3, 4
        ), rolled_up AS (
            INSERT INTO usage_daily AS d
                (tenant, user_id, day, model, requests, unpriced_requests, {summed})
            SELECT tenant, user_id, day, model, requests, unpriced_requests, {summed}
            FROM daily
            ORDER BY tenant, user_id, day, model
            ON CONFLICT (tenant, user_id, day, model) DO UPDATE SET
                requests = d.requests + excluded.requests,
                unpriced_requests = d.unpriced_requests + excluded.unpriced_requests,
                {adds}
        )
        SELECT count(*) FROM inserted
        """
    ).format(arrays=arrays, names=names, summed=summed, sums=sums, adds=adds)


# Rendered once: psycopg would otherwise re-render the Composed on every execute
# (about 0.1 ms per batch, which at low load is one batch per call).
_INSERT = _insert_statement().as_bytes(None)


def _delete_statement() -> sql.Composed:
    """Delete rows by key and take them back out of ``usage_daily``, in one statement."""
    summed = sql.SQL(", ").join(sql.Identifier(c) for c in _SUMMED)
    sums = sql.SQL(", ").join(
        sql.SQL("coalesce(sum({c}), 0)::bigint AS {c}").format(c=sql.Identifier(c)) for c in _SUMMED
    )
    subtracts = sql.SQL(", ").join(
        sql.SQL("{c} = d.{c} - g.{c}").format(c=sql.Identifier(c)) for c in _SUMMED
    )
    return sql.SQL(
        """
        WITH gone AS (
            DELETE FROM usage_records u
            USING unnest(%s::text[], %s::timestamptz[]) AS k(request_id, started_at)
            WHERE u.request_id = k.request_id AND u.started_at = k.started_at
            RETURNING u.started_at, u.tenant, u.user_id, u.requested_model, {summed}
        ), daily AS (
            SELECT (started_at AT TIME ZONE 'UTC')::date AS day, tenant, user_id,
                   requested_model AS model, count(*) AS requests,
                   count(*) FILTER (WHERE cost_usd_micros IS NULL) AS unpriced_requests,
                   {sums}
            FROM gone
            GROUP BY 1, 2, 3, 4
        ), rolled_back AS (
            UPDATE usage_daily AS d SET
                requests = d.requests - g.requests,
                unpriced_requests = d.unpriced_requests - g.unpriced_requests,
                {subtracts}
            FROM daily AS g
            WHERE (d.tenant, d.user_id, d.day, d.model) = (g.tenant, g.user_id, g.day, g.model)
        )
        SELECT count(*) FROM gone
        """
    ).format(summed=summed, sums=sums, subtracts=subtracts)


_DELETE = _delete_statement()

# Serialises writers deciding about the same caller-supplied request id (class key of
# the two-int advisory lock; the second int is the id's hash): "cgre".
_REQUEST_ID_LOCK_CLASS = 0x63677265


@dataclass(frozen=True, slots=True)
class StoredAttempt:
    """A row already stored under a request id: when it started, the fingerprint of
    the request that made it, and whether the caller got anything from it."""

    started_at: datetime
    fingerprint: str | None
    served: bool


def _served(record: UsageRecord) -> bool:
    # The caller got the first event (request id and model) exactly when the upstream
    # resolved a model; an attempt without it sent the caller nothing at all.
    return record.resolved_model is not None


def settle_attempts(
    stored: Sequence[StoredAttempt], incoming: Sequence[UsageRecord]
) -> tuple[list[datetime], set[datetime]]:
    """Which attempts of one caller-supplied request id stay, by ``started_at``:
    (stored rows to delete, incoming records to skip).

    One row per request id: an attempt that sent the caller nothing (it failed or was
    cancelled before the first event) is a placeholder, superseded by any attempt that
    served the caller, or else by the latest placeholder. Attempts that served the
    caller are all kept: admission refuses a second one, and should two ever be
    stored (two replicas racing while Postgres was away) the bill must not lose one.
    Incoming records already stored (a replay) are skipped.
    """
    # started_at → (served, stored). Aware datetimes hash by instant, so a replayed
    # record matches its row whatever the zone it was written in.
    attempts: dict[datetime, tuple[bool, bool]] = {a.started_at: (a.served, True) for a in stored}
    skip: set[datetime] = set()
    for r in incoming:
        if r.started_at not in attempts:
            attempts[r.started_at] = (_served(r), False)
        elif attempts[r.started_at][1]:
            skip.add(r.started_at)
        # else: the same record twice in one batch; ON CONFLICT keeps one.
    if any(served for served, _ in attempts.values()):
        victims = [t for t, (served, _) in attempts.items() if not served]
    else:
        latest = max(attempts)
        victims = [t for t in attempts if t != latest]
    delete = [t for t in victims if attempts[t][1]]
    skip |= {t for t in victims if not attempts[t][1]}
    return delete, skip


class UsageStore:
    """Usage rows in Postgres, through a connection pool the caller owns (and closes)."""

    def __init__(self, pool: Pool, *, attempt_window: timedelta = timedelta(days=1)) -> None:
        """``attempt_window``: how far back earlier attempts of a caller-supplied request
        id are looked for (the idempotency window, ``CHATGATE_REQUEST_ID_WINDOW_HOURS``)."""
        self._pool = pool
        self._attempt_window = attempt_window

    async def insert(
        self, records: Sequence[UsageRecord], on_connection: Callable[[], None] | None = None
    ) -> int:
        """Write a batch in one transaction; return how many rows were new.

        Records already stored (same request_id and started_at) are skipped and not
        counted again in ``usage_daily``, so replaying a batch is harmless. Records with
        a caller-supplied request id (those with a fingerprint) also settle earlier
        attempts of the same id (:func:`settle_attempts`), so a caller's retry leaves one
        row. Raises ValueError for a record with a naive ``started_at`` before touching
        the database. ``on_connection`` is called once a connection is in hand (the
        ledger times Postgres's silence from there).
        """
        if not records:
            return 0
        for r in records:
            _started_at(r)
        keyed = [r for r in records if r.request_fingerprint is not None]
        async with self._pool.connection() as conn:
            if on_connection is not None:
                on_connection()
            if not keyed:
                # The common case: generated ids, unique by construction. One statement.
                return await self._insert(conn, records)
            async with conn.transaction():
                skip = await self._settle(conn, keyed)
                if skip:
                    records = [r for r in records if (request_key(r.request_id), r.started_at) not in skip]
                return await self._insert(conn, records)

    @staticmethod
    async def _insert(conn: AsyncConnection[Any], records: Sequence[UsageRecord]) -> int:
        if not records:
            return 0
        params = [[column.value(r) for r in records] for column in _COLUMNS]
        async with conn.cursor(row_factory=tuple_row) as cur:
            # One statement, so one transaction even on an autocommit connection.
            await cur.execute(_INSERT, params)
            row = await cur.fetchone()
        return 0 if row is None else int(row[0])

    async def _settle(
        self, conn: AsyncConnection[Any], keyed: Sequence[UsageRecord]
    ) -> set[tuple[str, datetime]]:
        """Delete superseded attempts; return the incoming keys not to insert."""
        by_id: dict[str, list[UsageRecord]] = {}
        for r in keyed:
            by_id.setdefault(request_key(r.request_id), []).append(r)
        ids = sorted(by_id)
        since = min(r.started_at for r in keyed) - self._attempt_window
        async with conn.cursor(row_factory=tuple_row) as cur:
            # Per-id locks in a fixed order: two writers settling the same id (a replay
            # racing the live writer, two replicas) take turns instead of both inserting.
            await cur.execute(
                "SELECT pg_advisory_xact_lock(%s, h) FROM"
                " (SELECT DISTINCT hashtext(i) AS h FROM unnest(%s::text[]) AS i ORDER BY 1) AS s",
                [_REQUEST_ID_LOCK_CLASS, ids],
            )
            await cur.execute(
                "SELECT request_id, started_at, request_fingerprint, resolved_model IS NOT NULL"
                " FROM usage_records WHERE request_id = ANY(%s) AND started_at >= %s",
                [ids, since],
            )
            stored: dict[str, list[StoredAttempt]] = {}
            for request_id, started_at, fp, served in await cur.fetchall():
                stored.setdefault(request_id, []).append(
                    StoredAttempt(started_at, None if fp is None else bytes(fp).hex(), bool(served))
                )
        doomed: list[tuple[str, datetime]] = []
        skip: set[tuple[str, datetime]] = set()
        for request_id in ids:
            delete, skipped = settle_attempts(stored.get(request_id, []), by_id[request_id])
            doomed += [(request_id, t) for t in delete]
            skip |= {(request_id, t) for t in skipped}
        if doomed:
            async with conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute(_DELETE, [[k[0] for k in doomed], [k[1] for k in doomed]])
        return skip

    async def find_attempts(self, request_id: str, since: datetime) -> list[StoredAttempt]:
        """The stored rows for ``request_id`` that started at or after ``since``."""
        async with self._pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(
                "SELECT started_at, request_fingerprint, resolved_model IS NOT NULL"
                " FROM usage_records WHERE request_id = %s AND started_at >= %s",
                [request_key(request_id), since],
            )
            rows = await cur.fetchall()
        return [
            StoredAttempt(t, None if fp is None else bytes(fp).hex(), bool(served)) for t, fp, served in rows
        ]

    async def ping(self) -> None:
        """One round trip: raises when Postgres does not answer."""
        async with self._pool.connection() as conn:
            await conn.execute("SELECT 1")

    async def get(self, request_id: str) -> dict[str, Any] | None:
        """The stored row for ``request_id`` as a column → value dict, or None.

        Should two rows share a request id (different ``started_at``), the latest wins.
        """
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT * FROM usage_records WHERE request_id = %s ORDER BY started_at DESC LIMIT 1",
                [request_key(request_id)],
            )
            return await cur.fetchone()

    async def ensure_partitions(
        self,
        months_ahead: int = partitions.DEFAULT_MONTHS_AHEAD,
        months_behind: int = partitions.DEFAULT_MONTHS_BEHIND,
    ) -> int:
        """Create missing monthly partitions around now; see :func:`partitions.ensure_partitions`."""
        async with self._pool.connection() as conn:
            return await partitions.ensure_partitions(conn, months_ahead, months_behind)
