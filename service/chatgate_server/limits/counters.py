"""The shared counters' statements (migration 0010): each change is one call of one
database function — one statement, one round trip — on a pool configured for it
(autocommit, no prepared-statement surprises behind a pooler)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from chatgate_server.limits.buckets import BucketTake
from chatgate_server.limits.leases import PoolGrant, PoolSync

Pool = AsyncConnectionPool[AsyncConnection[Any]]


class CounterStore:
    """What the lease engine sends to Postgres; counts its statements (for the bench)."""

    def __init__(self, pool: Pool, *, holder: str, ttl_s: float) -> None:
        self._pool = pool
        self.holder = holder
        self.ttl_s = ttl_s
        self.statements = 0

    async def pool_sync(self, pool: str, ends_at: datetime | None, amount: int, sync: PoolSync) -> PoolGrant:
        self.statements += 1
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT held, granted, remaining FROM limit_pool_sync(%s, %s, %s, %s, %s, %s, %s, %s)",
                (pool, ends_at, self.holder, amount, sync.spent, sync.back, sync.want, self.ttl_s),
            )
            row = await cur.fetchone()
        assert row is not None
        return PoolGrant(int(row[0]), int(row[1]), int(row[2]))

    async def bucket_take(
        self, bucket: str, capacity: float, per_s: float, take: BucketTake
    ) -> tuple[int, float]:
        self.statements += 1
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT granted, level FROM limit_bucket_take(%s, %s, %s, %s, %s)",
                (bucket, capacity, per_s, take.want, take.back),
            )
            row = await cur.fetchone()
        assert row is not None
        return int(row[0]), float(row[1])

    async def heartbeat(self, live_s: float) -> int:
        """Say this holder is alive, reclaim expired leases; the number of live holders."""
        self.statements += 1
        async with self._pool.connection() as conn:
            row = await (
                await conn.execute("SELECT limit_heartbeat(%s, %s)", (self.holder, live_s))
            ).fetchone()
        return max(int(row[0]) if row else 1, 1)

    async def leave(self) -> None:
        """This holder stops: it no longer counts among the live processes."""
        self.statements += 1
        async with self._pool.connection() as conn:
            await conn.execute("DELETE FROM limit_holders WHERE holder = %s", (self.holder,))
