"""The SQL side of the ledger: write batches of usage rows, keep the daily roll-up.

One batch is one statement, hence one transaction: the records go in as one array per
column (``unnest``), rows that already exist are skipped (``ON CONFLICT DO NOTHING``),
and only the rows actually inserted feed the ``usage_daily`` upsert through a CTE. So
a replayed batch (the ledger's spool after an outage) inserts nothing and counts
nothing twice, and a crash between rows and roll-up cannot happen.

Arrays rather than a multi-row ``VALUES``: the statement text and its parameter count
are the same for every batch size, so the server can reuse one prepared plan, and
large batches never approach the 65535-parameter limit.

Lock order: concurrent writers (two replicas, or a replay racing a live batch) insert
rows in primary-key order and upsert roll-up rows in roll-up-key order, so two
transactions touching the same keys wait for each other instead of deadlocking.

Errors propagate as psycopg exceptions: ``psycopg.OperationalError`` (connection
trouble: try again later) or ``psycopg.DataError``/``psycopg.IntegrityError`` (a row
the schema refuses: retrying the same batch cannot succeed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, LiteralString

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool

from chatgate_server.domain import UsageRecord
from chatgate_server.usage import partitions

Pool = AsyncConnectionPool[AsyncConnection[Any]]


def _text(value: str) -> str:
    # Postgres text and jsonb cannot hold NUL; one caller-supplied NUL (in a user id or
    # a tag) would otherwise make the whole batch unwritable, forever.
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _opt_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def _tags(tags: Mapping[str, str]) -> str:
    return json.dumps({_text(k): _text(v) for k, v in tags.items()}, ensure_ascii=False, sort_keys=True)


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
    _Column("request_id", "text[]", lambda r: _text(r.request_id)),
    _Column("started_at", "timestamptz[]", _started_at),
    _Column("tenant", "text[]", lambda r: _text(r.tenant)),
    _Column("caller_service", "text[]", lambda r: _text(r.caller_service)),
    _Column("user_id", "text[]", lambda r: _text(r.user_id)),
    _Column("requested_model", "text[]", lambda r: _text(r.requested_model)),
    _Column("resolved_model", "text[]", lambda r: _opt_text(r.resolved_model)),
    _Column("upstream_response_id", "text[]", lambda r: _opt_text(r.upstream_response_id)),
    _Column("input_tokens", "bigint[]", lambda r: r.usage.input_tokens),
    _Column("output_tokens", "bigint[]", lambda r: r.usage.output_tokens),
    _Column("cached_input_tokens", "bigint[]", lambda r: r.usage.cached_input_tokens),
    _Column("reasoning_tokens", "bigint[]", lambda r: r.usage.reasoning_tokens),
    _Column("total_tokens", "bigint[]", lambda r: r.usage.total_tokens),
    _Column("cost_usd_micros", "bigint[]", lambda r: r.cost.usd_micros),
    _Column("usage_source", "text[]", lambda r: r.usage.source),
    _Column("estimate_encoding", "text[]", lambda r: _opt_text(r.usage.estimate_encoding)),
    _Column("price_version", "text[]", lambda r: _text(r.cost.price_version)),
    _Column("outcome", "text[]", lambda r: r.outcome.value),
    _Column("grpc_status", "text[]", lambda r: _text(r.grpc_status)),
    _Column("finish_reason", "text[]", lambda r: r.finish_reason),
    _Column("attempts", "integer[]", lambda r: r.attempts),
    _Column("ttft_ms", "float8[]", lambda r: r.time_to_first_token_ms),
    _Column("duration_ms", "float8[]", lambda r: r.duration_ms),
    _Column("trace_id", "text[]", lambda r: _opt_text(r.trace_id)),
    _Column("tags", "jsonb[]", lambda r: _tags(r.tags)),
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
    arrays = sql.SQL(", ").join(sql.SQL("%s::" + c.array_type) for c in _COLUMNS)
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


_INSERT = _insert_statement()


class UsageStore:
    """Usage rows in Postgres, through a connection pool the caller owns (and closes)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def insert(self, records: Sequence[UsageRecord]) -> int:
        """Write a batch in one statement; return how many rows were new.

        Records already stored (same request_id and started_at) are skipped and not
        counted again in ``usage_daily``, so replaying a batch is harmless. Raises
        ValueError for a record with a naive ``started_at`` before touching the database.
        """
        if not records:
            return 0
        params = [[column.value(r) for r in records] for column in _COLUMNS]
        async with self._pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
            # One statement, so one transaction even on an autocommit connection.
            await cur.execute(_INSERT, params)
            row = await cur.fetchone()
        return 0 if row is None else int(row[0])

    async def get(self, request_id: str) -> dict[str, Any] | None:
        """The stored row for ``request_id`` as a column → value dict, or None.

        Should two rows share a request id (different ``started_at``), the latest wins.
        """
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT * FROM usage_records WHERE request_id = %s ORDER BY started_at DESC LIMIT 1",
                [request_id],
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
