"""Blocks and their audit in Postgres (schema: migration 0011).

Reads serve the in-memory block table (limits/blocks.py); writes serve ``chatgate block``,
``unblock`` and the abuse detector. A block or unblock and its audit line are written in
one transaction: the audit never misses a change, nor records one that did not happen.
The functions that take a connection run inside the caller's transaction (the detector
blocks in the same transaction that records its finding).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from chatgate_server.limits.blocks_records import AuditEntry, Block, Scope, Source, Subject

Pool = AsyncConnectionPool[AsyncConnection[Any]]
Conn = AsyncConnection[Any]

# An operator's block replaces whatever was there. The detector's only ever lengthens a
# block (never shortens an operator's, never lifts one that is until unblocked).
_UPSERT = """
    INSERT INTO blocks (scope, tenant, subject, source, reason, blocked_by, blocked_at, expires_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (tenant, scope, subject) DO UPDATE SET
        source = excluded.source, reason = excluded.reason, blocked_by = excluded.blocked_by,
        blocked_at = excluded.blocked_at, expires_at = excluded.expires_at
"""
_DETECTOR_ONLY_LENGTHENS = """
    WHERE blocks.expires_at IS NOT NULL
      AND (blocks.expires_at <= excluded.blocked_at OR blocks.expires_at < excluded.expires_at)
"""


async def version(pool: Pool) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT version FROM block_table_version")).fetchone()
    return int(row[0]) if row else 0


async def active_blocks(pool: Pool, tenant: str | None = None) -> list[Block]:
    """The blocks that have not ended (by the database's clock)."""
    query = (
        "SELECT scope, tenant, subject, source, reason, blocked_by, blocked_at, expires_at"
        " FROM blocks WHERE (expires_at IS NULL OR expires_at > now())"
    )
    params: tuple[Any, ...] = ()
    if tenant is not None:
        query += " AND tenant = %s"
        params = (tenant,)
    async with pool.connection() as conn:
        rows = await (await conn.execute(query + " ORDER BY tenant, scope, subject", params)).fetchall()
    return [_block(row) for row in rows]


async def block(
    conn: Conn,
    subject: Subject,
    *,
    source: Source,
    reason: str,
    actor: str,
    now: datetime,
    expires_at: datetime | None,
) -> bool:
    """Block ``subject`` (in the caller's transaction) and audit it. False when the
    detector's block changed nothing (a longer block was already in place)."""
    query = _UPSERT + (_DETECTOR_ONLY_LENGTHENS if source is Source.DETECTOR else "")
    result = await conn.execute(
        query,
        (subject.scope.value, subject.tenant, subject.name, source.value, reason, actor, now, expires_at),
    )
    if result.rowcount == 0:
        return False
    await _audit(conn, "block", subject, source, actor, reason, expires_at, now)
    return True


async def unblock(conn: Conn, subject: Subject, *, actor: str, reason: str, now: datetime) -> bool:
    """Lift ``subject``'s block (in the caller's transaction); False if none applied."""
    result = await conn.execute(
        "DELETE FROM blocks WHERE tenant = %s AND scope = %s AND subject = %s"
        " RETURNING expires_at IS NULL OR expires_at > %s",
        (subject.tenant, subject.scope.value, subject.name, now),
    )
    row = await result.fetchone()
    if row is None or not row[0]:
        return False
    await _audit(conn, "unblock", subject, Source.OPERATOR, actor, reason, None, now)
    return True


async def blocked_now(conn: Conn, now: datetime) -> set[tuple[str, str, str]]:
    """Keys (scope, tenant, subject) of the blocks in force at ``now``."""
    rows = await (
        await conn.execute(
            "SELECT scope, tenant, subject FROM blocks WHERE expires_at IS NULL OR expires_at > %s", (now,)
        )
    ).fetchall()
    return {(str(s), str(t), str(n)) for s, t, n in rows}


async def audit(pool: Pool, *, tenant: str | None = None, limit: int = 100) -> list[AuditEntry]:
    """The latest audit lines, newest first."""
    query = "SELECT at, action, scope, tenant, subject, source, actor, reason, expires_at FROM block_audit"
    params: tuple[Any, ...] = ()
    if tenant is not None:
        query += " WHERE tenant = %s"
        params = (tenant,)
    async with pool.connection() as conn:
        rows = await (await conn.execute(query + " ORDER BY id DESC LIMIT %s", (*params, limit))).fetchall()
    return [
        AuditEntry(at, action, Subject(Scope(scope), tenant_, subject), Source(source), actor, reason, until)
        for at, action, scope, tenant_, subject, source, actor, reason, until in rows
    ]


async def _audit(
    conn: Conn,
    action: str,
    subject: Subject,
    source: Source,
    actor: str,
    reason: str,
    expires_at: datetime | None,
    now: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO block_audit (at, action, scope, tenant, subject, source, actor, reason, expires_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            now,
            action,
            subject.scope.value,
            subject.tenant,
            subject.name,
            source.value,
            actor,
            reason,
            expires_at,
        ),
    )


def _block(row: Sequence[Any]) -> Block:
    scope, tenant, name, source, reason, by, at, expires = row
    return Block(Subject(Scope(scope), tenant, name), Source(source), reason, by, at, expires)
