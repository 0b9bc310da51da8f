"""Monthly partitions of ``usage_records``, created ahead of the rows that need them.

``usage_records`` is range-partitioned by ``started_at`` into UTC months named
``usage_records_YYYYMM``, plus a DEFAULT partition as a safety net (see migration 0001
for the trade-off). The SQL functions that create partitions live in the migration;
this module is how the service calls them: at start-up, and from anything that runs
periodically (a replica that stays up for months must keep creating them).
"""

from __future__ import annotations

from datetime import date
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import tuple_row

DEFAULT_MONTHS_AHEAD = 3
DEFAULT_MONTHS_BEHIND = 1


async def ensure_partitions(
    conn: AsyncConnection[Any],
    months_ahead: int = DEFAULT_MONTHS_AHEAD,
    months_behind: int = DEFAULT_MONTHS_BEHIND,
) -> int:
    """Make sure this UTC month's partition and its neighbours exist; return how many were made.

    ``months_behind`` covers late rows (a spool replayed after an outage that spanned
    a month end). Cheap when nothing is missing: a catalog lookup per month, no lock.
    Runs in its own transaction on ``conn``.
    """
    async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute("SELECT chatgate_ensure_usage_partitions(%s, %s)", [months_ahead, months_behind])
        row = await cur.fetchone()
    if row is None:
        raise RuntimeError("chatgate_ensure_usage_partitions returned no row")
    return int(row[0])


async def create_partition(conn: AsyncConnection[Any], month: date) -> bool:
    """Create the partition for ``month``'s UTC month if missing (moving its rows out of
    the DEFAULT partition); True if it was created. For repairs and tests."""
    async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute("SELECT chatgate_create_usage_partition(%s)", [month])
        row = await cur.fetchone()
    if row is None:
        raise RuntimeError("chatgate_create_usage_partition returned no row")
    return bool(row[0])
