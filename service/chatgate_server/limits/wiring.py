"""The limits' resources for the composition root: their own small pool (a burst of
usage writes must never hold up a lease), the limit table, the lease engine, and the
admission policy built on them."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from chatgate_server.config import Settings
from chatgate_server.limits.counters import CounterStore
from chatgate_server.limits.engine import Leaser
from chatgate_server.limits.policy import LimitPolicy
from chatgate_server.limits.store import LimitStore
from chatgate_server.limits.table import LimitTable
from chatgate_server.usage import tokens
from chatgate_server.usage.connect import session_kwargs
from chatgate_server.usage.pricing import PriceTable

# How long start-up waits for the first load of the limit table.
LOAD_TIMEOUT_S = 5.0


async def _configure(conn: AsyncConnection[Any]) -> None:
    # Backs up the engine's own (shorter) timeout on the server's side. Commits stay
    # synchronous: a grant Postgres forgot after a crash could be granted twice.
    await conn.execute("SET statement_timeout = 3000")


def holder_name() -> str:
    """This process's name on the shared counters: unique per start."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LimitsRuntime:
    def __init__(self, url: str, settings: Settings, prices: PriceTable) -> None:
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=4,
            open=False,
            timeout=2,
            kwargs={"autocommit": True, **session_kwargs(settings.database_transaction_pooling)},
            # Behind a transaction-mode pooler a session setting would leak to other
            # clients: the engine's own timeout is then the only one.
            configure=None if settings.database_transaction_pooling else _configure,
            reconnect_timeout=settings.ledger_retry_cap_s,
        )
        self.table = LimitTable(LimitStore(self._pool))
        self.counters = CounterStore(self._pool, holder=holder_name(), ttl_s=settings.limits_lease_ttl_s)
        self.leaser = Leaser(self.counters)
        self.policy = LimitPolicy(
            self.table,
            self.leaser,
            tokens.TiktokenEstimator(),
            prices,
            max_completion_tokens=settings.limits_max_completion_tokens,
        )

    async def start(self, postgres_ok: bool) -> None:
        await self._pool.open(wait=False)
        await self.table.start(LOAD_TIMEOUT_S if postgres_ok else 1.0)
        self.leaser.start()

    async def stop(self) -> None:
        await self.table.stop()
        await self.leaser.stop()
        await self._pool.close()
