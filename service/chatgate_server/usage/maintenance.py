"""Operator jobs on the ledger: retention (drop old months) and repricing a window.

Both keep ``usage_daily`` equal to the sums of ``usage_records``: retention drops the
roll-up days it drops rows for, and repricing applies each row's cost change to its
roll-up row in the same transaction.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import tuple_row

from chatgate_server.domain import Outcome, TokenUsage
from chatgate_server.usage.pricing import PriceTable, default_table

log = logging.getLogger(__name__)

# The advisory lock chatgate_ensure_usage_partitions takes ("cgpartit"): retention and
# partition creation never run at the same time.
PARTITION_LOCK_KEY = 7162817296190433652
_PARTITION = re.compile(r"^usage_records_(\d{4})(\d{2})$")


def month_start(d: date, months_back: int = 0) -> date:
    index = d.year * 12 + d.month - 1 - months_back
    return date(index // 12, index % 12 + 1, 1)


@dataclass(frozen=True, slots=True)
class RetentionResult:
    cutoff: date
    """Rows that started before this (UTC) are gone."""
    dropped_partitions: list[str] = field(default_factory=list)
    deleted_default_rows: int = 0
    deleted_daily_rows: int = 0


async def apply_retention(
    conn: AsyncConnection[Any], months: int, *, today: date | None = None, dry_run: bool = False
) -> RetentionResult:
    """Keep this month and the ``months`` before it; drop whole monthly partitions older
    than that (plus stray rows in the default partition and old roll-up days).

    Dropping a partition is instant and leaves no dead tuples, unlike DELETE. Each drop
    is its own short transaction with a lock timeout: it needs a brief exclusive lock
    on the parent table, and must fail rather than queue behind a long report.
    ``conn`` must be in autocommit mode.
    """
    if months < 1:
        raise ValueError("retention must keep at least one month besides the current one")
    cutoff = month_start(today or datetime.now(UTC).date(), months)
    cutoff_ts = datetime.combine(cutoff, datetime.min.time(), tzinfo=UTC)
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'usage_records'::regclass"
    )
    old = []
    for (name,) in await cur.fetchall():
        match = _PARTITION.match(name)
        if match and month_start(date(int(match[1]), int(match[2]), 1), -1) <= cutoff:
            old.append(str(name))
    old.sort()
    if dry_run:
        async with conn.cursor(row_factory=tuple_row) as c:
            await c.execute("SELECT count(*) FROM usage_records_default WHERE started_at < %s", [cutoff_ts])
            default_rows = int((await c.fetchone() or (0,))[0])
            await c.execute("SELECT count(*) FROM usage_daily WHERE day < %s", [cutoff])
            daily_rows = int((await c.fetchone() or (0,))[0])
        return RetentionResult(cutoff, old, default_rows, daily_rows)
    dropped: list[str] = []
    for name in old:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '5s'")
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", [PARTITION_LOCK_KEY])
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
        log.info("retention: dropped partition %s", name)
        dropped.append(name)
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '5s'")
        default_cur = await conn.execute(
            "DELETE FROM usage_records_default WHERE started_at < %s", [cutoff_ts]
        )
        daily_cur = await conn.execute("DELETE FROM usage_daily WHERE day < %s", [cutoff])
    return RetentionResult(cutoff, dropped, default_cur.rowcount, daily_cur.rowcount)


@dataclass(frozen=True, slots=True)
class RepriceResult:
    examined: int
    changed: int
    cost_delta_usd_micros: int
    """Sum of (new − old) over the priced rows."""
    price_versions: tuple[str, ...]
    """The price versions the changed rows now carry."""


async def reprice(
    conn: AsyncConnection[Any],
    start: datetime,
    end: datetime,
    *,
    dry_run: bool = False,
    slice_: timedelta = timedelta(hours=1),
    prices: PriceTable | None = None,
    deployment_prices: Mapping[str, PriceTable] | None = None,
) -> RepriceResult:
    """Recompute the cost of rows that started in ``[start, end)`` with ``prices`` (default
    the shipped table): each row gets the price version in force when it started, and a
    call the upstream refused or failed before producing anything costs nothing — the
    same rules as the request path (:meth:`PriceTable.bill`).

    Rows whose cost or price version changes are updated, and their roll-up rows get
    the difference, in one transaction per ``slice_`` of the window (rows locked while
    it runs), so the job can be stopped and rerun at any point: a rerun finds nothing
    left to change. The model priced is the one the upstream resolved, else the one
    requested — the same choice the request path makes; and a row served by a deployment
    in ``deployment_prices`` (by name) is priced from that deployment's table, as it was
    when served. ``conn`` must be in autocommit mode.
    """
    table = prices or default_table()
    tables = deployment_prices or {}
    examined = changed = delta = 0
    versions: set[str] = set()
    t = start
    while t < end:
        upto = min(t + slice_, end)
        async with conn.transaction():
            e, c, d = await _reprice_slice(conn, t, upto, dry_run, table, tables, versions)
        examined, changed, delta = examined + e, changed + c, delta + d
        t = upto
    return RepriceResult(examined, changed, delta, tuple(sorted(versions)))


async def _reprice_slice(
    conn: AsyncConnection[Any],
    start: datetime,
    end: datetime,
    dry_run: bool,
    table: PriceTable,
    tables: Mapping[str, PriceTable],
    versions: set[str],
) -> tuple[int, int, int]:
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(
            sql.SQL(
                "SELECT request_id, started_at, tenant, user_id, requested_model, resolved_model,"
                " input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, usage_source,"
                " cost_usd_micros, price_version, cost_basis, outcome, upstream_response_id, deployment"
                " FROM usage_records WHERE started_at >= %s AND started_at < %s{}"
            ).format(sql.SQL("" if dry_run else " FOR UPDATE")),
            [start, end],
        )
        rows = await cur.fetchall()
    ids: list[str] = []
    starts: list[datetime] = []
    costs: list[int | None] = []
    new_versions: list[str] = []
    bases: list[str | None] = []
    # Roll-up key → [cost delta, unpriced delta]
    daily: dict[tuple[str, str, date, str], list[int]] = defaultdict(lambda: [0, 0])
    delta = 0
    for (
        request_id,
        started_at,
        tenant,
        user_id,
        requested,
        resolved,
        i,
        o,
        c,
        r,
        source,
        old,
        version,
        basis,
        outcome,
        response_id,
        deployment,
    ) in rows:
        usage = TokenUsage(
            input_tokens=i, output_tokens=o, cached_input_tokens=c, reasoning_tokens=r, source=source
        )
        responded = resolved is not None or response_id is not None or source == "reported"
        cost = tables.get(deployment or "", table).bill(
            resolved or requested, usage, outcome=Outcome(outcome), responded=responded, at=started_at
        )
        new = cost.usd_micros
        new_basis = cost.basis.value if cost.basis else None
        if (new, cost.price_version, new_basis) == (old, version, basis):
            continue
        ids.append(request_id)
        starts.append(started_at)
        costs.append(new)
        new_versions.append(cost.price_version)
        bases.append(new_basis)
        versions.add(cost.price_version)
        acc = daily[(tenant, user_id, started_at.astimezone(UTC).date(), requested)]
        acc[0] += (new or 0) - (old or 0)
        acc[1] += (new is None) - (old is None)
        delta += (new or 0) - (old or 0)
    if ids and not dry_run:
        await conn.execute(
            "UPDATE usage_records u"
            " SET cost_usd_micros = v.cost, price_version = v.version, cost_basis = v.basis"
            " FROM unnest(%s::text[], %s::timestamptz[], %s::bigint[], %s::text[], %s::text[])"
            " AS v(request_id, started_at, cost, version, basis)"
            " WHERE u.request_id = v.request_id AND u.started_at = v.started_at",
            [ids, starts, costs, new_versions, bases],
        )
        keys = sorted(k for k, v in daily.items() if v != [0, 0])
        if keys:
            await conn.execute(
                "UPDATE usage_daily d SET cost_usd_micros = d.cost_usd_micros + v.cost,"
                " unpriced_requests = d.unpriced_requests + v.unpriced"
                " FROM unnest(%s::text[], %s::text[], %s::date[], %s::text[], %s::bigint[], %s::bigint[])"
                " AS v(tenant, user_id, day, model, cost, unpriced)"
                " WHERE (d.tenant, d.user_id, d.day, d.model) = (v.tenant, v.user_id, v.day, v.model)",
                [
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                    [k[2] for k in keys],
                    [k[3] for k in keys],
                    [daily[k][0] for k in keys],
                    [daily[k][1] for k in keys],
                ],
            )
    return len(rows), len(ids), delta
