"""The lease engine and the limits policy over an in-memory stand-in for the shared
counters (the same arithmetic as migration 0010's functions): all or nothing, exact
across several processes, a share each while Postgres is away."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from chatgate_server.admission import NO_TICKET
from chatgate_server.domain import (
    Caller,
    ChatMessage,
    CompletionRequest,
    Cost,
    CostBasis,
    LimitKind,
    Outcome,
    SamplingOptions,
    TokenUsage,
    UsageRecord,
)
from chatgate_server.errors import QuotaExceeded
from chatgate_server.limits.buckets import BucketAccount, BucketTake
from chatgate_server.limits.definitions import Definition, Limit, Scope, Target
from chatgate_server.limits.engine import EngineTuning, Leaser
from chatgate_server.limits.leases import PoolAccount, PoolGrant, PoolSync
from chatgate_server.limits.policy import LimitPolicy, LimitTicket
from chatgate_server.limits.table import LimitIndex
from chatgate_server.usage.pricing import default_table

WALL = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


class SharedCounters:
    """The database's side: pools with leases, and buckets (time stands still)."""

    def __init__(self) -> None:
        self.taken: dict[str, int] = {}
        self.leases: dict[tuple[str, str], int] = {}
        self.levels: dict[str, float] = {}
        self.down = False

    def store(self, holder: str) -> FakeStore:
        return FakeStore(self, holder)


class FakeStore:
    def __init__(self, shared: SharedCounters, holder: str) -> None:
        self.shared, self.holder, self.ttl_s, self.statements = shared, holder, 10.0, 0

    async def pool_sync(self, pool: str, ends_at: datetime | None, amount: int, sync: PoolSync) -> PoolGrant:
        self.statements += 1
        s = self.shared
        if s.down:
            raise OSError("postgres away")
        taken = s.taken.get(pool, 0)
        held = s.leases.get((pool, self.holder), 0)
        over = max(0, sync.spent - held)
        back = min(max(sync.back, 0), max(0, held - sync.spent))
        taken += over - back
        grant = min(max(sync.want, 0), max(0, amount - taken))
        taken += grant
        held = max(0, held - sync.spent) - back + grant
        s.taken[pool], s.leases[(pool, self.holder)] = taken, held
        return PoolGrant(held, grant, max(0, amount - taken))

    async def bucket_take(
        self, bucket: str, capacity: float, per_s: float, take: BucketTake
    ) -> tuple[int, float]:
        self.statements += 1
        s = self.shared
        if s.down:
            raise OSError("postgres away")
        level = min(capacity, s.levels.get(bucket, capacity) + take.back)
        grant = min(max(take.want, 0), max(0, int(level)))
        s.levels[bucket] = level - grant
        return grant, level - grant

    async def heartbeat(self, live_s: float) -> int:
        return 3

    async def leave(self) -> None:
        pass


def index(*definitions: tuple[Target, LimitKind, int]) -> LimitIndex:
    return LimitIndex([Definition(t, k, a) for t, k, a in definitions], WALL)


class Table:
    def __init__(self, idx: LimitIndex) -> None:
        self.index = idx

    def applicable(self, tenant: str, caller: str, user: str, model: str) -> tuple[object, ...]:
        return self.index.applicable(tenant, caller, user, model)


class Estimator:
    """Every request's input counts 10 tokens."""

    def estimate(self, request: CompletionRequest, relayed: object) -> TokenUsage:
        return TokenUsage(input_tokens=10, source="estimated")


def policy(idx: LimitIndex, leaser: Leaser) -> LimitPolicy:
    return LimitPolicy(
        Table(idx),  # type: ignore[arg-type]
        leaser,
        Estimator(),
        default_table(),
        max_completion_tokens=90,
        wall=lambda: WALL,
    )


def leaser(shared: SharedCounters, holder: str = "p1", **tuning: float) -> Leaser:
    return Leaser(shared.store(holder), tuning=EngineTuning(**tuning), wall=lambda: WALL)  # type: ignore[arg-type]


def call(user: str = "u1", model: str = "gpt-4o-mini", max_tokens: int | None = None) -> CompletionRequest:
    return CompletionRequest(
        "r",
        model,
        (ChatMessage("user", "hi"),),
        user,
        caller=Caller("acme", "billing"),
        sampling=SamplingOptions(max_completion_tokens=max_tokens),
    )


def record(tokens: int, micros: int | None = 0, basis: CostBasis = CostBasis.PRICED) -> UsageRecord:
    return UsageRecord(
        "r", "acme", "billing", "u1", "gpt-4o-mini", None, None,
        TokenUsage(input_tokens=tokens, output_tokens=0), Cost(micros, "v", basis),
        Outcome.COMPLETED, "OK", "stop", 1, None, 1.0, WALL,
    )  # fmt: skip


TENANT = Target(Scope.TENANT, "acme")
CALLER = Target(Scope.CALLER, "acme", "billing")
USER = Target(Scope.USER, "acme", "u1")
EACH = Target(Scope.USER, "acme", "*")


async def test_no_limits_no_ticket() -> None:
    p = policy(index((Target(Scope.TENANT, "other"), LimitKind.TOKENS_PER_DAY, 5)), leaser(SharedCounters()))
    assert await p.admit(call()) is NO_TICKET


async def test_the_cap_is_sent_when_a_token_limit_applies_and_the_caller_set_none() -> None:
    p = policy(index((USER, LimitKind.TOKENS_PER_DAY, 1000)), leaser(SharedCounters()))
    ticket = await p.admit(call())
    assert ticket.amend(call()).sampling.max_completion_tokens == 90
    mine = await p.admit(call(max_tokens=7))
    assert mine.amend(call(max_tokens=7)).sampling.max_completion_tokens == 7


async def test_rate_only_limits_send_no_cap() -> None:
    p = policy(index((USER, LimitKind.REQUESTS_PER_MINUTE, 10)), leaser(SharedCounters()))
    ticket = await p.admit(call())
    assert ticket.amend(call()).sampling.max_completion_tokens is None


async def test_all_or_nothing_when_the_third_limit_refuses() -> None:
    shared = SharedCounters()
    lease = leaser(shared)
    idx = index(
        (TENANT, LimitKind.TOKENS_PER_DAY, 10_000),
        (CALLER, LimitKind.TOKENS_PER_DAY, 10_000),
        (USER, LimitKind.TOKENS_PER_DAY, 150),
    )
    p = policy(idx, lease)
    first = await p.admit(call())  # reserves 100 on each
    with pytest.raises(QuotaExceeded) as refused:
        await p.admit(call())
    assert refused.value.reason == "TOKENS_PER_DAY_EXCEEDED"
    assert [v.subject for v in refused.value.violations] == ["user:acme/u1"]
    # The tenant's and the caller's reservations for the refused call went back.
    for entry, _ in first._held:  # type: ignore[attr-defined]
        assert entry.account.reserved == 100


async def test_one_violation_per_limit_exceeded_and_retry_is_the_longest() -> None:
    idx = index((TENANT, LimitKind.REQUESTS_PER_MINUTE, 1), (USER, LimitKind.TOKENS_PER_DAY, 100))
    p = policy(idx, leaser(SharedCounters()))
    await p.admit(call())
    with pytest.raises(QuotaExceeded) as refused:
        await p.admit(call())
    assert [v.subject for v in refused.value.violations] == ["tenant:acme", "user:acme/u1"]
    assert refused.value.reason == "REQUESTS_PER_MINUTE_EXCEEDED"
    # Until midnight (12 h, longer than the 60 s refill), stated as at most an hour.
    assert refused.value.retry_after == 3600


async def test_a_monthly_budget_gives_no_retry() -> None:
    p = policy(index((USER, LimitKind.SPEND_PER_MONTH, 1)), leaser(SharedCounters()))
    with pytest.raises(QuotaExceeded) as refused:
        await p.admit(call())
    assert refused.value.retry_after is None  # one call costs more than the whole budget


async def test_settlement_frees_what_the_call_did_not_use() -> None:
    p = policy(index((USER, LimitKind.TOKENS_PER_DAY, 200)), leaser(SharedCounters()))
    ticket = await p.admit(call())
    ticket.settle(record(30))
    second = await p.admit(call())
    (allowance,) = second.allowances
    assert allowance.remaining == 200 - 30 - 100


async def test_spend_settles_to_the_recorded_cost_and_nothing_when_not_charged() -> None:
    shared = SharedCounters()
    p = policy(index((USER, LimitKind.SPEND_PER_DAY, 10_000)), leaser(shared))
    a = await p.admit(call())
    a.settle(record(0, 0, CostBasis.NOT_CHARGED))
    b = await p.admit(call())
    b.settle(record(0, None, CostBasis.PRICE_UNKNOWN))  # the reservation stands
    c = await p.admit(call())
    (allowance,) = c.allowances
    reservation = (
        default_table().cost("gpt-4o-mini", TokenUsage(input_tokens=10, output_tokens=90)).usd_micros
    )
    assert reservation is not None
    assert allowance.remaining == 10_000 - 2 * reservation


async def test_release_gives_everything_back() -> None:
    p = policy(index((USER, LimitKind.REQUESTS_PER_MINUTE, 1)), leaser(SharedCounters()))
    ticket = await p.admit(call())
    assert isinstance(ticket, LimitTicket)
    ticket.release()
    ticket.release()  # at most once
    await p.admit(call())


async def test_each_user_default_is_a_limit_per_user() -> None:
    p = policy(index((EACH, LimitKind.REQUESTS_PER_MINUTE, 1)), leaser(SharedCounters()))
    await p.admit(call(user="a"))
    await p.admit(call(user="b"))
    with pytest.raises(QuotaExceeded):
        await p.admit(call(user="a"))


async def test_three_processes_never_admit_more_than_the_budget() -> None:
    shared = SharedCounters()
    idx = index((USER, LimitKind.TOKENS_PER_DAY, 1000))  # 10 calls of 100
    policies = [policy(idx, leaser(shared, f"p{i}")) for i in range(3)]

    async def one(p: LimitPolicy) -> bool:
        try:
            ticket = await p.admit(call())
        except QuotaExceeded:
            return False
        await asyncio.sleep(0)
        ticket.settle(record(100))
        return True

    results = await asyncio.gather(*(one(policies[i % 3]) for i in range(60)))
    assert sum(results) == 10
    assert shared.taken[next(iter(shared.taken))] <= 1000


async def test_postgres_away_each_process_admits_its_share() -> None:
    shared = SharedCounters()
    shared.down = True
    lease = leaser(shared)
    lease.away, lease.live = True, 3
    p = policy(index((USER, LimitKind.TOKENS_PER_DAY, 900)), lease)
    admitted = 0
    for _ in range(10):
        try:
            await p.admit(call())
            admitted += 1
        except QuotaExceeded:
            break
    assert admitted == 3  # 900 / 3 processes = 300 = 3 calls: never unlimited, never none


async def test_a_failed_sync_marks_postgres_away_and_a_good_one_clears_it() -> None:
    shared = SharedCounters()
    lease = leaser(shared, wait_s=0.2)
    p = policy(index((USER, LimitKind.TOKENS_PER_DAY, 900)), lease)
    shared.down = True
    # Holding nothing, the call waits for one sync; it fails, so Postgres is away and
    # the call is admitted against this process's share (limit ÷ live processes: 1).
    await p.admit(call())
    assert lease.away
    shared.down = False
    entry = next(iter(lease._entries.values()))
    entry.failed_at = -1e9
    await lease._sync(entry)
    assert not lease.away
    # what was spent while away is reported, so the pool knows it
    assert sum(shared.taken.values()) >= 100


def test_table_lookup_prefers_a_users_own_limit_over_the_default() -> None:
    idx = index(
        (EACH, LimitKind.TOKENS_PER_DAY, 100),
        (EACH, LimitKind.REQUESTS_PER_MINUTE, 5),
        (USER, LimitKind.TOKENS_PER_DAY, 999),
        (dataclasses.replace(TENANT, model="gpt-4o"), LimitKind.SPEND_PER_DAY, 7),
    )
    found = {
        (lim.target.label, lim.kind, lim.amount) for lim in idx.applicable("acme", "billing", "u1", "gpt-4o")
    }
    assert found == {
        ("user:acme/u1", LimitKind.TOKENS_PER_DAY, 999),
        ("user:acme/u1", LimitKind.REQUESTS_PER_MINUTE, 5),
        ("tenant:acme/model:gpt-4o", LimitKind.SPEND_PER_DAY, 7),
    }
    assert idx.applicable("acme", "billing", "u1", "gpt-4o-mini") == tuple(
        lim for lim in idx.applicable("acme", "billing", "u1", "gpt-4o") if not lim.target.model
    )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limit(kind: LimitKind = LimitKind.TOKENS_PER_DAY, amount: int = 1000) -> Limit:
    return Limit(USER, kind, amount)


async def test_stop_gives_back_everything_and_reports_what_was_spent() -> None:
    shared = SharedCounters()
    lease = leaser(shared)
    entry = lease.entry(limit(), WALL)
    assert await lease.acquire(entry, 100)
    entry.account.settle(100, 40)
    await lease.stop()
    ((pool, taken),) = shared.taken.items()
    assert taken == 40  # spent stays taken; the unused slice went back
    assert shared.leases[(pool, "p1")] == 0


async def test_an_exhausted_counter_is_asked_again_only_after_recheck_s() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = Leaser(shared.store("p1"), tuning=EngineTuning(recheck_s=1.0), clock=clock, wall=lambda: WALL)  # type: ignore[arg-type]
    store = lease._store
    entry = lease.entry(limit(amount=100), WALL)
    assert await lease.acquire(entry, 100)
    assert not await lease.acquire(entry, 1)  # it synced: the pool is empty
    asked = store.statements
    clock.now += 0.5
    assert not await lease.acquire(entry, 1)
    assert store.statements == asked  # seen empty half a second ago: not asked again
    clock.now += 0.6
    entry.account.settle(100, 50)
    assert await lease.acquire(entry, 1)  # 50 came back locally…
    assert not await lease.acquire(entry, 60)  # …and the pool, asked again, has none
    assert store.statements > asked


async def test_a_new_day_is_a_new_account_and_a_new_amount_applies_at_once() -> None:
    lease = leaser(SharedCounters())
    today = lease.entry(limit(), WALL)
    assert lease.entry(limit(), WALL) is today
    tomorrow = lease.entry(limit(), WALL + timedelta(days=1))
    assert tomorrow is not today and tomorrow.ends_at == datetime(2026, 12, 6, tzinfo=UTC)
    bigger = lease.entry(limit(amount=5000), WALL + timedelta(days=1))
    assert bigger is tomorrow and tomorrow.account.amount == 5000
    rate = lease.entry(limit(LimitKind.REQUESTS_PER_MINUTE, 60), WALL)
    assert rate.ends_at is None and isinstance(rate.account, BucketAccount)


async def test_tend_gives_back_idle_slices_then_forgets_the_account() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = Leaser(shared.store("p1"), tuning=EngineTuning(idle_s=2.0), clock=clock, wall=lambda: WALL)  # type: ignore[arg-type]
    entry = lease.entry(limit(), WALL)
    assert await lease.acquire(entry, 10)
    entry.account.settle(10, 10)
    clock.now += 2.0
    lease.tend(clock.now)
    assert entry.syncing is not None
    await entry.syncing
    assert entry.account.held == 0 and sum(shared.taken.values()) == 10
    clock.now += 60.0
    lease.tend(clock.now)
    assert lease.entry(limit(), WALL) is not entry  # forgotten, made anew


async def test_the_heartbeat_counts_the_live_processes_and_sees_postgres_back() -> None:
    lease = leaser(SharedCounters())
    lease.away = True
    await lease._heartbeat()
    assert lease.live == 3 and not lease.away


async def test_a_call_cancelled_while_waiting_keeps_nothing_reserved() -> None:
    shared = SharedCounters()
    lease = leaser(shared, wait_s=5.0)
    idx = index((TENANT, LimitKind.REQUESTS_PER_MINUTE, 100), (USER, LimitKind.TOKENS_PER_DAY, 1000))
    p = policy(idx, lease)
    await p.admit(call())  # both accounts hold slices now
    by_target = {lim.target: lease.entry(lim, WALL) for lim in idx.applicable("acme", "billing", "u1", "")}
    tenant, user = by_target[TENANT].account, by_target[USER].account
    gate = asyncio.Event()
    original = lease._store.pool_sync

    async def stuck(*args: object) -> PoolGrant:
        await gate.wait()
        return await original(*args)  # type: ignore[arg-type]

    lease._store.pool_sync = stuck  # type: ignore[method-assign,assignment]
    assert isinstance(user, PoolAccount)
    user.held = user.spent + user.reserved  # nothing left locally: the user's limit must wait
    tenant_before = tenant.held
    waiting = asyncio.ensure_future(p.admit(call()))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert tenant.held == tenant_before - 1  # the tenant's request is reserved meanwhile
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    gate.set()
    assert tenant.held == tenant_before  # …and given back when the caller left
    assert user.reserved == 100  # only the first call's reservation
