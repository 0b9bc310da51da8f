"""Every limit definition in memory, so that finding a call's limits never waits on Postgres.

Reloaded when ``limit_table_version`` moves (one read of a one-row table every
``poll_s``, as the caller table does, for the same reasons: a notification is lost
while its connection is down and never passes a transaction-mode pooler) and when a
time-limited definition (the abuse detector's tightening) expires. While Postgres is
away the table keeps what it last loaded. A table that never loaded applies no limits
— limits are not authentication: a replica that starts while Postgres is away serves,
and says so in its log (docs/LIMITS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from chatgate_server.domain import LimitKind
from chatgate_server.limits.definitions import (
    EACH_USER,
    Definition,
    Limit,
    Scope,
    Target,
    effective,
    next_expiry,
)
from chatgate_server.limits.store import LimitStore
from chatgate_server.table_poll import TablePoller

log = logging.getLogger(__name__)

_Key = tuple[Scope, str, str, str]
# Calls' (tenant, caller, user, model) → their limits; cleared at each reload.
_CACHE_MAX = 100_000


class LimitIndex:
    """The effective limits of one load, indexed for the per-call lookup."""

    def __init__(self, definitions: Iterable[Definition], now: datetime) -> None:
        definitions = list(definitions)
        self._by_target: dict[_Key, dict[LimitKind, int]] = {}
        for (target, kind), amount in effective(definitions, now).items():
            key = (target.scope, target.tenant, target.subject, target.model)
            self._by_target.setdefault(key, {})[kind] = amount
        self._tenants = frozenset(k[1] for k in self._by_target)
        self.next_change = next_expiry(definitions, now)
        self._cache: dict[tuple[str, str, str, str], tuple[Limit, ...]] = {}
        self._limits: dict[Limit, Limit] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_target.values())

    def applicable(self, tenant: str, caller: str, user: str, model: str) -> tuple[Limit, ...]:
        """Every limit on a call: tenant, caller and user (the user's own amount for a
        kind, else the tenant's default for each user), each for all models and for
        ``model``."""
        if tenant not in self._tenants:
            return ()
        key = (tenant, caller, user, model)
        found = self._cache.get(key)
        if found is None:
            found = tuple(self._collect(tenant, caller, user, model))
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
                self._limits.clear()
            self._cache[key] = found
        return found

    def _collect(self, tenant: str, caller: str, user: str, model: str) -> Iterable[Limit]:
        for m in ("", model) if model else ("",):
            yield from self._own(Target(Scope.TENANT, tenant, "", m))
            yield from self._own(Target(Scope.CALLER, tenant, caller, m))
            mine = self._by_target.get((Scope.USER, tenant, user, m), {})
            default = self._by_target.get((Scope.USER, tenant, EACH_USER, m), {})
            target = Target(Scope.USER, tenant, user, m)
            for kind, amount in (default | mine).items():
                yield self._limit(target, kind, amount)

    def _own(self, target: Target) -> Iterable[Limit]:
        key = (target.scope, target.tenant, target.subject, target.model)
        for kind, amount in self._by_target.get(key, {}).items():
            yield self._limit(target, kind, amount)

    def _limit(self, target: Target, kind: LimitKind, amount: int) -> Limit:
        """One object per limit per load, shared by every call it applies to (the lease
        engine finds its account by identity on the hot path)."""
        made = Limit(target, kind, amount)
        return self._limits.setdefault(made, made)


class LimitTable:
    """The current :class:`LimitIndex`, kept fresh by a background poll."""

    def __init__(
        self,
        store: LimitStore,
        *,
        poll_s: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._clock = clock
        self.index = LimitIndex((), clock())
        self.loaded = False
        self._version: int | None = None
        self._poller = TablePoller(
            self.refresh, what="limit table", unloaded="no limits apply until it loads", poll_s=poll_s
        )

    def applicable(self, tenant: str, caller: str, user: str, model: str) -> tuple[Limit, ...]:
        return self.index.applicable(tenant, caller, user, model)

    async def refresh(self) -> bool:
        """Reload if the version moved or a definition expired; True if it reloaded."""
        version = await self._store.version()
        now = self._clock()
        change = self.index.next_change
        if version == self._version and (change is None or change > now):
            return False
        self.index = LimitIndex(await self._store.definitions(), now)
        self._version = version
        self.loaded = True
        return True

    async def start(self, load_timeout_s: float | None = None) -> bool:
        """Load once (waiting at most ``load_timeout_s``; a failure is logged and the poll
        retries), then keep refreshing (table_poll.py). True if the table is loaded."""
        await self._poller.start(load_timeout_s)
        return self.loaded

    async def stop(self) -> None:
        await self._poller.stop()
