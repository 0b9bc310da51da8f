"""The limit definitions in Postgres (migration 0009): read by the limit table, written
by ``chatgate limits set | clear``. Only this module and counters.py hold limits' SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from chatgate_server.domain import LimitKind
from chatgate_server.limits.definitions import Definition, Scope, Target

Pool = AsyncConnectionPool[AsyncConnection[Any]]

_SELECT = (
    "SELECT scope, tenant, subject, model, kind, source, amount, expires_at, reason, set_by, set_at"
    " FROM limits"
)


class LimitStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def version(self) -> int:
        async with self._pool.connection() as conn:
            row = await (await conn.execute("SELECT version FROM limit_table_version")).fetchone()
        return int(row[0]) if row else 0

    async def definitions(self, tenant: str | None = None) -> list[Definition]:
        query = (
            _SELECT
            + (" WHERE tenant = %s" if tenant else "")
            + " ORDER BY tenant, scope, subject, model, kind"
        )
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(query, (tenant,) if tenant else ())).fetchall()
        return [_definition(row) for row in rows]

    async def set(
        self,
        target: Target,
        amounts: dict[LimitKind, int],
        *,
        set_by: str,
        reason: str = "",
        expires_at: datetime | None = None,
    ) -> None:
        """Set the operator's amounts for ``target`` (one transaction: seen whole)."""
        async with self._pool.connection() as conn, conn.transaction():
            for kind, amount in amounts.items():
                await conn.execute(
                    "INSERT INTO limits (scope, tenant, subject, model, kind, source, amount, expires_at,"
                    " reason, set_by) VALUES (%s, %s, %s, %s, %s, 'operator', %s, %s, %s, %s)"
                    " ON CONFLICT (tenant, scope, subject, model, kind, source) DO UPDATE SET"
                    " amount = EXCLUDED.amount, expires_at = EXCLUDED.expires_at,"
                    " reason = EXCLUDED.reason, set_by = EXCLUDED.set_by, set_at = now()",
                    (*_target(target), str(kind), amount, expires_at, reason, set_by),
                )

    async def clear(self, target: Target, kinds: Sequence[LimitKind] = ()) -> int:
        """Remove the operator's limits on ``target`` (only ``kinds`` if given); how many."""
        query = "DELETE FROM limits WHERE scope = %s AND tenant = %s AND subject = %s AND model = %s"
        query += " AND source = 'operator'"
        params: tuple[Any, ...] = _target(target)
        if kinds:
            query += " AND kind = ANY(%s)"
            params += ([str(k) for k in kinds],)
        async with self._pool.connection() as conn:
            result = await conn.execute(query, params)
        return result.rowcount


def _target(t: Target) -> tuple[str, str, str, str]:
    return (str(t.scope), t.tenant, t.subject, t.model)


def _definition(row: Sequence[Any]) -> Definition:
    scope, tenant, subject, model, kind, source, amount, expires, reason, set_by, set_at = row
    return Definition(
        Target(Scope(scope), tenant, subject, model),
        LimitKind(kind),
        int(amount),
        source=source,
        expires_at=expires,
        reason=reason,
        set_by=set_by,
        set_at=set_at,
    )
