"""The limit table: reloads when the version moves and when a tightening expires."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from chatgate_server.domain import LimitKind
from chatgate_server.limits.definitions import Definition, Scope, Target
from chatgate_server.limits.table import LimitTable

USER = Target(Scope.USER, "acme", "u1")
T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


class Store:
    def __init__(self) -> None:
        self.version_now = 1
        self.rows: list[Definition] = []
        self.loads = 0

    async def version(self) -> int:
        return self.version_now

    async def definitions(self) -> list[Definition]:
        self.loads += 1
        return list(self.rows)


def amounts(table: LimitTable) -> dict[LimitKind, int]:
    return {lim.kind: lim.amount for lim in table.applicable("acme", "billing", "u1", "gpt-4o")}


async def test_the_smallest_unexpired_amount_wins_and_an_expiry_reloads() -> None:
    store, now = Store(), [T0]
    store.rows = [
        Definition(USER, LimitKind.TOKENS_PER_DAY, 1000),
        Definition(
            USER, LimitKind.TOKENS_PER_DAY, 100, source="detector", expires_at=T0 + timedelta(hours=1)
        ),
    ]
    table = LimitTable(store, clock=lambda: now[0])  # type: ignore[arg-type]
    assert await table.refresh()
    assert amounts(table) == {LimitKind.TOKENS_PER_DAY: 100}
    assert not await table.refresh()  # nothing moved: no reload
    now[0] = T0 + timedelta(hours=1, seconds=1)
    assert await table.refresh()  # the tightening ended: the operator's amount is back
    assert amounts(table) == {LimitKind.TOKENS_PER_DAY: 1000}


async def test_a_new_version_reloads() -> None:
    store = Store()
    table = LimitTable(store, clock=lambda: T0)  # type: ignore[arg-type]
    await table.refresh()
    assert amounts(table) == {}
    store.rows = [Definition(USER, LimitKind.CONCURRENT_STREAMS, 3)]
    assert not await table.refresh()
    store.version_now = 2
    assert await table.refresh()
    assert amounts(table) == {LimitKind.CONCURRENT_STREAMS: 3}
    assert store.loads == 2
