"""The lease engine and the limits policy over an in-memory stand-in for the shared
counters (the same arithmetic as migration 0010's functions): all or nothing, exact
across several processes, a share each while Postgres is away."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
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
        self.calls: list[tuple[object, ...]] = []
        """What each statement named: the counter, its window's end or its size."""

    async def pool_sync(self, pool: str, ends_at: datetime | None, amount: int, sync: PoolSync) -> PoolGrant:
        self.statements += 1
        self.calls.append((pool, ends_at, amount))
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
        self.calls.append((bucket, capacity, per_s))
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
    """Every message of the request counts 10 tokens (the tests send one)."""

    def estimate(self, request: CompletionRequest, relayed: Sequence[str]) -> TokenUsage:
        relayed_tokens = len("".join(relayed))  # nothing is relayed before admission
        return TokenUsage(input_tokens=10 * len(request.messages) + relayed_tokens, source="estimated")


def policy(idx: LimitIndex, leaser: Leaser, *, wall: datetime = WALL) -> LimitPolicy:
    return LimitPolicy(
        Table(idx),  # type: ignore[arg-type]
        leaser,
        Estimator(),
        default_table(),
        max_completion_tokens=90,
        wall=lambda: wall,
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


# --- the engine's own decisions (mutation testing, docs/TESTING.md) -----------------


def test_the_default_tuning_is_what_docs_limits_states() -> None:
    t = EngineTuning()
    # LIMITS.md: ~10 s of demand per budget slice, 4 s per rate slice; unused for 2 s
    # gives everything back; one bounded wait of 0.5 s; a counter seen empty is asked
    # again after a second; a heartbeat each second.
    assert (t.horizon_s, t.bucket_horizon_s, t.idle_s, t.wait_s) == (10.0, 4.0, 2.0, 0.5)
    assert (t.recheck_s, t.heartbeat_s) == (1.0, 1.0)


def clocked(shared: SharedCounters, clock: Clock, **tuning: float) -> Leaser:
    return Leaser(shared.store("p1"), tuning=EngineTuning(**tuning), clock=clock, wall=lambda: WALL)  # type: ignore[arg-type]


async def test_a_take_that_leaves_the_account_low_syncs_in_the_background() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    entry = lease.entry(limit(), WALL)
    assert await lease.acquire(entry, 1)  # the slice is one call: the take left it empty
    assert entry.syncing is not None  # …so it asked for more at once, without waiting
    await entry.syncing
    assert entry.account.held > 1


async def test_a_rate_limit_is_taken_from_the_shared_bucket() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    entry = lease.entry(limit(LimitKind.REQUESTS_PER_MINUTE, 60), WALL)
    assert await lease.acquire(entry, 1)
    ((bucket, level),) = shared.levels.items()
    assert bucket == entry.name and level == 60 - 1  # one token left the bucket for this call
    assert isinstance(entry.account, BucketAccount)
    assert entry.account.level == level and entry.account.held == 0
    assert not lease.away


async def test_a_bucket_with_nothing_to_take_or_give_sends_nothing() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    entry = lease.entry(limit(LimitKind.REQUESTS_PER_MINUTE, 60), WALL)
    clock.now += 2.0
    await lease._sync(entry)  # unused, holding nothing: idle with nothing to give back
    assert lease.statements == 0 and entry.synced_at == clock.now


async def test_an_empty_bucket_is_asked_again_only_after_recheck_s() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock, recheck_s=1.0)
    entry = lease.entry(limit(LimitKind.REQUESTS_PER_MINUTE, 2), WALL)
    assert await lease.acquire(entry, 2)  # the whole bucket
    assert not await lease.acquire(entry, 1)  # asked: the bucket is empty
    asked = lease.statements
    assert not await lease.acquire(entry, 1)
    assert lease.statements == asked  # seen empty just now: not asked again
    clock.now += 1.0  # seen a second ago: it may have changed, so it is asked again
    await lease.acquire(entry, 1)
    assert lease.statements > asked


async def test_a_failed_bucket_take_marks_postgres_away_and_the_local_share_admits() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    lease.live = 3
    entry = lease.entry(limit(LimitKind.REQUESTS_PER_MINUTE, 60), WALL)
    shared.down = True
    admitted = [await lease.acquire(entry, 1) for _ in range(30)]
    assert lease.away
    assert sum(admitted) == 0  # going away adds no burst (buckets.py)...
    clock.now += 6.0
    admitted = [await lease.acquire(entry, 1) for _ in range(30)]
    assert sum(admitted) == 2  # ...only the share of the rate: 1/s ÷ 3 processes, never none
    shared.down = False
    clock.now += 1.0  # past retry_s: the next sync reaches Postgres again
    await lease._sync(entry)
    assert not lease.away


async def test_a_failed_bucket_take_keeps_its_debt_owed() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    entry = lease.entry(limit(LimitKind.TOKENS_PER_MINUTE, 600), WALL)
    entry.account.held = -4.0  # a call used 4 beyond its reservation
    shared.down = True
    await lease._sync(entry)
    assert lease.away and entry.account.held == -4.0  # still owed: paid at the next take
    shared.down = False
    clock.now += 1.0
    await lease._sync(entry)
    assert not lease.away
    granted = entry.account.held
    assert granted >= 1 and shared.levels[entry.name] == 600 - 4 - granted


async def test_after_a_failed_sync_calls_do_not_wait_for_another_within_retry_s() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock, retry_s=1.0)
    entry = lease.entry(limit(), WALL)
    shared.down = True
    await lease._sync(entry)
    assert lease.away and entry.failed_at == clock.now
    lease.away = False  # a heartbeat saw Postgres back; this account still backs off
    shared.down = False
    clock.now += 0.5
    asked = lease.statements
    assert not await lease.acquire(entry, 1)  # refused at once: no sync to wait for
    assert lease.statements == asked and entry.syncing is None
    clock.now += 0.5
    assert await lease.acquire(entry, 1)
    assert lease.statements == asked + 1


async def test_a_lease_is_renewed_at_half_life_even_with_nothing_to_report() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock, idle_s=100.0)
    entry = lease.entry(limit(), WALL)
    account = entry.account
    assert isinstance(account, PoolAccount)
    account.pending = 1
    await lease._sync(entry)
    account.pending = 0
    assert account.held == 1 and account.lease_until == clock.now + 10.0  # one call's slice
    clock.now += 4.9
    asked = lease.statements
    await lease._sync(entry)
    assert lease.statements == asked  # before half-life: nothing to say
    clock.now += 0.1
    await lease._sync(entry)
    assert lease.statements == asked + 1 and account.lease_until == clock.now + 10.0
    assert account.held == 1


async def test_the_heartbeat_asks_to_be_counted_live_for_three_beats_or_a_lease() -> None:
    seen: list[float] = []

    class Recording(FakeStore):
        async def heartbeat(self, live_s: float) -> int:
            seen.append(live_s)
            return 2

    shared = SharedCounters()
    for beat, ttl, expected in ((1.0, 10.0, 10.0), (5.0, 10.0, 15.0)):
        store = Recording(shared, "p1")
        store.ttl_s = ttl
        lease = Leaser(store, tuning=EngineTuning(heartbeat_s=beat))  # type: ignore[arg-type]
        await lease._heartbeat()
        assert seen[-1] == expected and lease.live == 2


async def test_a_failed_heartbeat_keeps_the_last_count_and_says_nothing_of_postgres() -> None:
    class Failing(FakeStore):
        async def heartbeat(self, live_s: float) -> int:
            raise OSError("postgres away")

    lease = Leaser(Failing(SharedCounters(), "p1"))  # type: ignore[arg-type]
    lease.live, lease.away = 4, True
    await lease._heartbeat()
    assert (lease.live, lease.away) == (4, True)


async def test_an_idle_account_is_forgotten_after_thirty_idle_periods_not_before() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock, idle_s=2.0)
    lim = limit()  # the same object throughout, as the table keeps it between reloads
    entry = lease.entry(lim, WALL)
    assert await lease.acquire(entry, 10)
    entry.account.settle(10, 10)
    if entry.syncing is not None:
        await entry.syncing
    used = entry.account.last_take
    clock.now = used + 2.0
    lease.tend(clock.now)
    assert entry.syncing is not None
    await entry.syncing
    clock.now = used + 59.9
    lease.tend(clock.now)
    assert lease.entry(lim, WALL) is entry
    clock.now = used + 60.0
    lease.tend(clock.now)
    assert lease.entry(lim, WALL) is not entry  # forgotten, also by the hot path


async def test_tend_leaves_an_account_alone_while_it_syncs() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    entry = lease.entry(limit(), WALL)
    gate = asyncio.Event()
    original = shared.store("p1").pool_sync

    async def slow(*args: object) -> PoolGrant:
        await gate.wait()
        return await original(*args)  # type: ignore[arg-type]

    lease._store.pool_sync = slow  # type: ignore[method-assign,assignment]
    entry.account.pending = 10
    lease._start_sync(entry)
    syncing = entry.syncing
    clock.now += 1000.0  # long idle, and the lease due: tend would sync or forget it
    lease.tend(clock.now)
    assert entry.syncing is syncing and lease.entry(limit(), WALL) is entry
    gate.set()
    assert syncing is not None
    await syncing


async def test_the_loop_beats_every_heartbeat_s_and_tends_every_tick() -> None:
    shared, clock = SharedCounters(), Clock()
    beats: list[float] = []

    class Recording(FakeStore):
        async def heartbeat(self, live_s: float) -> int:
            beats.append(clock.now)
            return 2

    tuning = EngineTuning(tick_s=0.001, heartbeat_s=1.0)
    lease = Leaser(Recording(shared, "p1"), tuning=tuning, clock=clock, wall=lambda: WALL)  # type: ignore[arg-type]
    tended: list[float] = []
    lease.tend = tended.append  # type: ignore[method-assign,assignment]

    async def ticks(n: int) -> None:
        goal = len(tended) + n
        for _ in range(1000):  # bounded: the loop ticks every millisecond
            await asyncio.sleep(0.001)
            if len(tended) >= goal:
                return
        raise AssertionError("the loop stopped ticking")

    clock.now = 0.0  # even at the clock's very start, the first tick beats
    lease.start()
    await ticks(5)
    assert beats == [0.0] and set(tended) == {0.0}  # the clock stands still: one beat
    clock.now = 0.9
    await ticks(3)
    assert beats == [0.0]
    clock.now = 1.0  # a heartbeat_s later
    await ticks(3)
    assert beats == [0.0, 1.0] and tended[-1] == 1.0
    await lease.stop()
    await lease.stop()  # twice is harmless


async def test_the_loop_beats_and_tends_and_stop_gives_back_and_leaves() -> None:
    beats: list[float] = []
    left: list[str] = []

    class Recording(FakeStore):
        async def heartbeat(self, live_s: float) -> int:
            beats.append(live_s)
            return 2

        async def leave(self) -> None:
            left.append(self.holder)

    shared = SharedCounters()
    tuning = EngineTuning(tick_s=0.001, heartbeat_s=0.001, idle_s=0.01)
    lease = Leaser(Recording(shared, "p1"), tuning=tuning)  # type: ignore[arg-type]
    entry = lease.entry(limit(), WALL)
    assert await lease.acquire(entry, 10)
    entry.account.settle(10, 10)
    lease.away = True
    lease.start()
    for _ in range(1000):  # bounded: the loop ticks every millisecond
        await asyncio.sleep(0.001)
        if len(beats) >= 2 and entry.account.held == 0:
            break
    assert len(beats) >= 2 and lease.live == 2 and not lease.away
    # tend gave the idle slice back and reported what was spent
    assert entry.account.held == 0 and sum(shared.taken.values()) == 10
    await lease.stop()
    assert left == ["p1"]
    beaten = len(beats)
    await asyncio.sleep(0.01)
    assert len(beats) == beaten  # the loop stopped


async def test_stop_waits_for_a_sync_under_way_then_gives_back() -> None:
    shared = SharedCounters()
    lease = leaser(shared)
    entry = lease.entry(limit(), WALL)
    entry.account.pending = 40
    lease._start_sync(entry)  # under way when stop begins
    entry.account.pending = 0
    await lease.stop()
    assert entry.account.held == 0 and sum(shared.taken.values()) == 0
    assert shared.leases[(entry.name, "p1")] == 0


async def test_stop_survives_a_goodbye_postgres_does_not_answer() -> None:
    class Failing(FakeStore):
        async def leave(self) -> None:
            raise OSError("postgres away")

    lease = Leaser(Failing(SharedCounters(), "p1"))  # type: ignore[arg-type]
    await lease.stop()  # nothing raised: it stays counted until its heartbeat ages out


# --- the policy's decisions, as callers see them ------------------------------------


async def refusal(p: LimitPolicy, request: CompletionRequest | None = None) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as refused:
        await p.admit(request or call())
    return refused.value


async def test_the_default_cap_is_4096_output_tokens() -> None:
    idx = index((USER, LimitKind.TOKENS_PER_DAY, 100_000))
    p = LimitPolicy(Table(idx), leaser(SharedCounters()), Estimator(), default_table(), wall=lambda: WALL)  # type: ignore[arg-type]
    ticket = await p.admit(call())
    assert ticket.amend(call()).sampling.max_completion_tokens == 4096
    (allowance,) = ticket.allowances
    assert allowance.remaining == 100_000 - (10 + 4096)


async def test_a_call_larger_than_the_limit_is_told_so_and_given_no_retry() -> None:
    p = policy(index((USER, LimitKind.TOKENS_PER_DAY, 99)), leaser(SharedCounters()))
    refused = await refusal(p)  # 10 in + 90 out
    assert refused.retry_after is None
    (violation,) = refused.violations
    assert violation.subject == "user:acme/u1"
    assert violation.description == "limit of 99 tokens per day (UTC): this call alone needs 100"
    assert str(refused).startswith("user:acme/u1: tokens per day (UTC) limit reached")


async def test_a_call_that_exactly_fits_the_limit_is_admitted() -> None:
    p = policy(index((USER, LimitKind.TOKENS_PER_DAY, 100)), leaser(SharedCounters()))
    ticket = await p.admit(call())
    (allowance,) = ticket.allowances
    assert allowance.remaining == 0
    refused = await refusal(p)
    (violation,) = refused.violations
    assert violation.description == "limit of 100 tokens per day (UTC) reached (this call needs 100)"


async def test_an_unpriced_model_under_a_spend_limit_is_refused_and_says_why() -> None:
    p = policy(index((USER, LimitKind.SPEND_PER_DAY, 10**9)), leaser(SharedCounters()))
    refused = await refusal(p, call(model="no-such-model"))
    assert refused.reason == "SPEND_PER_DAY_EXCEEDED" and refused.retry_after is None
    (violation,) = refused.violations
    assert violation.description == (
        "limit of 1000000000 micro-dollars per day (UTC): the model has no price, so no spend can be admitted"
    )


async def test_an_unpriced_model_under_a_token_limit_only_is_admitted() -> None:
    p = policy(index((USER, LimitKind.TOKENS_PER_DAY, 1000)), leaser(SharedCounters()))
    ticket = await p.admit(call(model="no-such-model"))
    (allowance,) = ticket.allowances
    assert allowance.remaining == 1000 - 100


async def test_spend_reserves_the_priced_tokens_and_tokens_the_count() -> None:
    idx = index((USER, LimitKind.SPEND_PER_DAY, 10_000), (USER, LimitKind.TOKENS_PER_DAY, 1000))
    p = policy(idx, leaser(SharedCounters()))
    ticket = await p.admit(call(max_tokens=50))
    reservation = default_table().cost("gpt-4o-mini", TokenUsage(10, 50)).usd_micros
    assert reservation
    remaining = {a.kind: a.remaining for a in ticket.allowances}
    assert remaining == {LimitKind.SPEND_PER_DAY: 10_000 - reservation, LimitKind.TOKENS_PER_DAY: 1000 - 60}


async def test_a_stream_slot_comes_back_at_settlement_and_a_refusal_says_retry_in_a_second() -> None:
    p = policy(index((USER, LimitKind.CONCURRENT_STREAMS, 1)), leaser(SharedCounters()))
    ticket = await p.admit(call())
    (allowance,) = ticket.allowances
    assert (allowance.limit, allowance.remaining, allowance.resets_at) == (1, 0, None)
    refused = await refusal(p)
    assert refused.reason == "CONCURRENT_STREAMS_EXCEEDED" and refused.retry_after == 1.0
    assert refused.violations[0].description == "limit of 1 concurrent streams reached (this call needs 1)"
    ticket.settle(record(500))
    await p.admit(call())  # the slot came back


async def test_a_request_counts_once_per_call_whatever_it_used() -> None:
    p = policy(index((USER, LimitKind.REQUESTS_PER_MINUTE, 2)), leaser(SharedCounters()))
    ticket = await p.admit(call())
    ticket.settle(record(500))  # no tokens are counted against a request rate
    await p.admit(call())
    refused = await refusal(p)
    assert refused.reason == "REQUESTS_PER_MINUTE_EXCEEDED"
    assert refused.retry_after == pytest.approx(30.0, abs=0.5)  # one request refills in 30 s


async def test_tokens_settle_to_what_the_call_used_never_below_zero() -> None:
    p = policy(index((USER, LimitKind.TOKENS_PER_DAY, 1000)), leaser(SharedCounters()))
    (await p.admit(call())).settle(record(130))  # 30 beyond its reservation: counted
    (await p.admit(call())).settle(record(-5))  # a nonsense count frees the reservation
    ticket = await p.admit(call())
    (allowance,) = ticket.allowances
    assert allowance.remaining == 1000 - 130 - 0 - 100


async def test_settle_after_release_and_twice_counts_once() -> None:
    p = policy(index((USER, LimitKind.TOKENS_PER_DAY, 1000)), leaser(SharedCounters()))
    ticket = await p.admit(call())
    ticket.settle(record(40))
    ticket.settle(record(40))
    ticket.release()
    other = await p.admit(call())
    other.release()
    other.settle(record(999))
    (allowance,) = (await p.admit(call())).allowances
    assert allowance.remaining == 1000 - 40 - 100


RPM = LimitKind.REQUESTS_PER_MINUTE


async def test_a_rate_allowance_counts_the_bucket_and_says_when_it_is_full_again() -> None:
    clock = Clock()
    idx = index((USER, LimitKind.REQUESTS_PER_MINUTE, 120))  # refills 2 per second
    lease = Leaser(SharedCounters().store("p1"), clock=clock, wall=lambda: WALL)  # type: ignore[arg-type]
    p = LimitPolicy(Table(idx), lease, Estimator(), default_table(), clock=clock, wall=lambda: WALL)  # type: ignore[arg-type]
    ticket = await p.admit(call())
    (allowance,) = ticket.allowances
    assert (allowance.subject, allowance.kind, allowance.limit) == ("user:acme/u1", RPM, 120)
    entry = lease.entry(idx.applicable("acme", "billing", "u1", "")[0], WALL)
    account = entry.account
    assert isinstance(account, BucketAccount)
    level = account.level_now(clock.now)
    assert allowance.remaining == int(level + max(account.held, 0))
    assert allowance.resets_at == WALL + timedelta(seconds=(120 - level) / 2)
    account.held, account.level = 5.0, 100.0
    (allowance,) = ticket.allowances
    assert allowance.remaining == 105 and allowance.resets_at == WALL + timedelta(seconds=10)
    account.held = 1.0  # one token held counts too
    (allowance,) = ticket.allowances
    assert allowance.remaining == 101
    account.held = -3.0  # a debt is not subtracted twice: the level is what others see
    (allowance,) = ticket.allowances
    assert allowance.remaining == 100
    account.level = 130.0  # never more than the limit
    account.held = 0.0
    (allowance,) = ticket.allowances
    assert allowance.remaining == 120


async def test_a_budget_allowance_resets_at_the_end_of_the_window() -> None:
    p = policy(index((USER, LimitKind.SPEND_PER_MONTH, 10**6)), leaser(SharedCounters()))
    (allowance,) = (await p.admit(call())).allowances
    assert allowance.resets_at == datetime(2027, 1, 1, tzinfo=UTC)
    assert 0 < allowance.remaining < 10**6


async def test_a_daily_refusal_waits_until_midnight_at_least_a_second() -> None:
    idx = index((USER, LimitKind.TOKENS_PER_DAY, 100))
    late = WALL.replace(hour=23, minute=59, second=59, microsecond=500_000)
    for wall, expected in ((WALL.replace(hour=23, minute=50), 600.0), (late, 1.0)):
        p = policy(idx, leaser(SharedCounters()), wall=wall)
        await p.admit(call())
        refused = await refusal(p)
        assert refused.retry_after == expected


async def test_a_refusal_names_the_first_limit_and_retries_after_the_longest_wait() -> None:
    idx = index((USER, LimitKind.REQUESTS_PER_MINUTE, 1), (TENANT, LimitKind.REQUESTS_PER_MINUTE, 2))
    p = policy(idx, leaser(SharedCounters()))
    await p.admit(call())
    refused = await refusal(p)
    # Only the user's limit refused (the tenant's has room): one violation, its wait.
    assert [v.subject for v in refused.violations] == ["user:acme/u1"]
    assert refused.retry_after == pytest.approx(60.0, abs=0.5)


async def test_waiting_on_one_limit_and_refused_on_another_returns_both_reservations() -> None:
    shared = SharedCounters()
    lease = leaser(shared, wait_s=0.2)
    idx = index((TENANT, LimitKind.TOKENS_PER_DAY, 10_000), (USER, LimitKind.CONCURRENT_STREAMS, 1))
    p = policy(idx, lease)
    first = await p.admit(call())
    tenant = lease.entry(idx.applicable("acme", "billing", "u1", "")[0], WALL).account
    reserved = tenant.reserved if isinstance(tenant, PoolAccount) else None
    await refusal(p)  # the stream slot is taken: the tenant's tokens go back
    assert isinstance(tenant, PoolAccount) and tenant.reserved == reserved
    first.settle(record(100))
    await p.admit(call())  # after the wait for a sync, the slot is free again


async def test_a_process_that_never_counted_the_others_takes_the_whole_limit_as_its_share() -> None:
    shared = SharedCounters()
    shared.down = True
    lease = leaser(shared)  # no heartbeat yet: it knows of itself alone
    p = policy(index((USER, LimitKind.TOKENS_PER_DAY, 200)), lease)
    await p.admit(call())
    assert lease.away
    await p.admit(call())  # 200 ÷ 1 process: two calls of 100
    await refusal(p)


async def test_at_midnight_exactly_a_call_counts_against_the_new_day() -> None:
    lease = leaser(SharedCounters())
    lim = limit()  # the same object: the hot path's check of the window decides
    today = lease.entry(lim, WALL)
    midnight = datetime(2026, 12, 5, tzinfo=UTC)
    assert lease.entry(lim, midnight) is not today
    assert lease.entry(lim, midnight).ends_at == datetime(2026, 12, 6, tzinfo=UTC)


async def test_a_reloaded_limit_is_what_refusals_and_allowances_name() -> None:
    lease = leaser(SharedCounters())
    first = lease.entry(limit(amount=1000), WALL)
    reloaded = limit(amount=300)
    again = lease.entry(reloaded, WALL)
    assert again is first and again.limit is reloaded and again.account.amount == 300
    assert lease.entry(reloaded, WALL).limit is reloaded


async def test_a_rate_is_one_bucket_named_by_its_limit_alone() -> None:
    lease = leaser(SharedCounters())
    rate = limit(LimitKind.TOKENS_PER_MINUTE, 600)
    assert lease.entry(rate, WALL).name == rate.key  # no window: it refills continuously
    assert lease.entry(limit(), WALL).name == f"{limit().key}@2026-12-04"


class Gated(FakeStore):
    """Pool syncs wait for ``gate``; counts the syncs begun."""

    def __init__(self, shared: SharedCounters, holder: str) -> None:
        super().__init__(shared, holder)
        self.gate = asyncio.Event()
        self.begun = 0

    async def pool_sync(self, pool: str, ends_at: datetime | None, amount: int, sync: PoolSync) -> PoolGrant:
        self.begun += 1
        await self.gate.wait()
        return await super().pool_sync(pool, ends_at, amount, sync)


async def test_one_sync_at_a_time_per_account() -> None:
    store = Gated(SharedCounters(), "p1")
    lease = Leaser(store, wall=lambda: WALL)  # type: ignore[arg-type]
    entry = lease.entry(limit(), WALL)
    account = entry.account
    assert isinstance(account, PoolAccount)
    account.held, account.lease_until, account.rate = 3, 1e12, 10.0  # busy: 10 per second
    assert lease.take(entry, 1)  # low: a sync begins
    await asyncio.sleep(0)
    syncing = entry.syncing
    assert syncing is not None and store.begun == 1
    assert lease.take(entry, 1)  # lower still, but a sync is under way
    await asyncio.sleep(0)
    assert entry.syncing is syncing and store.begun == 1
    store.gate.set()
    await syncing


async def test_a_busy_account_syncs_far_less_than_once_per_call() -> None:
    shared = SharedCounters()
    lease = leaser(shared)
    entry = lease.entry(limit(amount=100_000), WALL)
    for _ in range(200):
        assert await lease.acquire(entry, 1)
        entry.account.settle(1, 1)
        await asyncio.sleep(0)
    assert lease.statements <= 20


async def test_a_call_waits_for_a_stuck_sync_only_until_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    store, clock = Gated(SharedCounters(), "p1"), Clock()
    lease = Leaser(store, tuning=EngineTuning(wait_s=0.05), clock=clock, wall=lambda: WALL)  # type: ignore[arg-type]
    entry = lease.entry(limit(), WALL)
    waits: list[float | None] = []
    wait_for = asyncio.wait_for

    async def recording(aw: asyncio.Future[None], timeout: float | None) -> None:
        waits.append(timeout)
        clock.now += 0.05  # the wait used up the call's time
        await wait_for(aw, timeout)

    monkeypatch.setattr(asyncio, "wait_for", recording)
    admitted = await wait_for(lease.acquire(entry, 1), 5.0)  # bounded, whatever happens
    assert not admitted and waits == [pytest.approx(0.05)]
    store.gate.set()


async def test_a_call_admitted_by_the_sync_it_waited_for() -> None:
    shared = SharedCounters()
    lease = leaser(shared, wait_s=0.5)

    class Slow(FakeStore):
        async def pool_sync(self, *args: object) -> PoolGrant:
            await asyncio.sleep(0.01)  # a real round trip, well within the wait
            return await super().pool_sync(*args)  # type: ignore[arg-type]

    lease._store = Slow(shared, "p1")  # type: ignore[assignment]
    entry = lease.entry(limit(), WALL)
    assert await lease.acquire(entry, 100)


async def test_a_counter_seen_just_short_is_refused_without_asking_again() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    bucket = lease.entry(limit(LimitKind.REQUESTS_PER_MINUTE, 60), WALL)
    account = bucket.account
    assert isinstance(account, BucketAccount)
    shared.levels[bucket.name] = 2.0
    account.level, account.level_at, bucket.synced_at = 2.0, clock.now, clock.now
    assert not await lease.acquire(bucket, 3)  # 2 left, none held: waiting cannot help
    assert lease.statements == 0
    account.held = 1.0  # 2 in the bucket + 1 held: enough, so it asks
    assert await lease.acquire(bucket, 3)
    assert lease.statements == 1
    pool = lease.entry(limit(amount=100), WALL)
    pa = pool.account
    assert isinstance(pa, PoolAccount)
    shared.taken[pool.name] = 95
    pa.remaining, pool.synced_at = 5, clock.now
    assert not await lease.acquire(pool, 6)
    assert lease.statements == 1
    assert await lease.acquire(pool, 5)  # exactly what remains: worth asking


async def test_postgres_going_away_is_logged_once_with_the_share(caplog: pytest.LogCaptureFixture) -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    lease.live = 4
    entry = lease.entry(limit(), WALL)
    entry.account.pending = 10
    shared.down = True
    with caplog.at_level("INFO", logger="chatgate_server.limits.engine"):
        await lease._sync(entry)
        assert [r.levelname for r in caplog.records] == ["WARNING"]  # at once
        clock.now += 5.0
        await lease._sync(entry)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "OSError" in warnings[0] and "25% of each limit" in warnings[0]
        lease.away, lease.live = False, 1
        clock.now += 5.0
        await lease._sync(entry)
        assert "100% of each limit" in caplog.records[-1].getMessage()  # alone: all of it
        caplog.clear()
        lease.live = 4
        shared.down = False
        clock.now += 5.0
        await lease._sync(entry)
        assert [r.levelname for r in caplog.records] == ["INFO"]


async def test_an_idle_account_holding_nothing_sends_nothing() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    entry = lease.entry(limit(), WALL)
    clock.now += 20.0  # idle, its (empty) lease long expired
    await lease._sync(entry)
    assert lease.statements == 0


async def test_idle_accounts_report_a_spend_of_one_and_give_back_a_slice_of_one() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    spent, unused = lease.entry(limit(), WALL), lease.entry(limit(LimitKind.SPEND_PER_DAY), WALL)
    for entry in (spent, unused):
        entry.account.pending = 1
        await lease._sync(entry)
        entry.account.pending = 0
    assert lease.take(spent, 1, clock.now)
    spent.account.settle(1, 1)
    clock.now += 2.0
    for entry in (spent, unused):
        await lease._sync(entry)
        assert shared.leases[(entry.name, "p1")] == 0 and entry.account.held == 0
    assert shared.taken == {spent.name: 1, unused.name: 0}


async def test_statements_name_the_counter_its_window_and_its_rate() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    day = lease.entry(limit(amount=500), WALL)
    rate = lease.entry(limit(LimitKind.REQUESTS_PER_MINUTE, 120), WALL)
    assert await lease.acquire(day, 1) and await lease.acquire(rate, 1)
    store = lease._store
    assert isinstance(store, FakeStore)
    assert (day.name, datetime(2026, 12, 5, tzinfo=UTC), 500) in store.calls
    assert (rate.name, 120.0, 2.0) in store.calls  # capacity, and refilled at 2 per second


async def test_an_idle_bucket_gives_its_slice_back_to_the_shared_bucket() -> None:
    shared, clock = SharedCounters(), Clock()
    lease = clocked(shared, clock)
    entry = lease.entry(limit(LimitKind.TOKENS_PER_MINUTE, 600), WALL)
    entry.account.pending = 50
    await lease._sync(entry)
    entry.account.pending = 0
    assert shared.levels[entry.name] == 550
    clock.now += 2.0
    await lease._sync(entry)
    assert shared.levels[entry.name] == 600 and entry.account.held == 0


class Stuck(FakeStore):
    """Every statement hangs: Postgres reachable but not answering."""

    async def pool_sync(self, *args: object) -> PoolGrant:
        await asyncio.Event().wait()
        raise AssertionError

    async def bucket_take(self, *args: object) -> tuple[int, float]:
        await asyncio.Event().wait()
        raise AssertionError

    async def heartbeat(self, live_s: float) -> int:
        await asyncio.Event().wait()
        raise AssertionError

    async def leave(self) -> None:
        await asyncio.Event().wait()


async def test_a_statement_that_does_not_answer_in_db_timeout_s_counts_as_postgres_away() -> None:
    clock = Clock()
    lease = Leaser(Stuck(SharedCounters(), "p1"), tuning=EngineTuning(db_timeout_s=0.01), clock=clock)  # type: ignore[arg-type]
    pool = lease.entry(limit(), WALL)
    account = pool.account
    assert isinstance(account, PoolAccount)
    account.held, account.lease_until = 30, 1e12
    clock.now += 2.0  # idle: the sync gives the 30 back
    await asyncio.wait_for(lease._sync(pool), 5.0)  # bounded, whatever happens
    assert lease.away and pool.failed_at == clock.now
    assert (account.held, account.returning) == (0, 0)  # assumed given back: never too much
    bucket = lease.entry(limit(LimitKind.REQUESTS_PER_MINUTE, 60), WALL)
    bucket.account.pending = 1
    await asyncio.wait_for(lease._sync(bucket), 5.0)
    assert bucket.failed_at == clock.now
    lease.live = 3
    await asyncio.wait_for(lease._heartbeat(), 5.0)
    assert lease.live == 3
    await asyncio.wait_for(lease.stop(), 5.0)  # a goodbye that hangs does not hold shutdown


async def test_stop_lets_a_sync_under_way_finish_before_giving_back() -> None:
    shared = SharedCounters()
    store = Gated(shared, "p1")
    lease = Leaser(store, wall=lambda: WALL)  # type: ignore[arg-type]
    entry = lease.entry(limit(), WALL)
    entry.account.pending = 40
    lease._start_sync(entry)
    entry.account.pending = 0
    stopping = asyncio.ensure_future(lease.stop())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not stopping.done() and store.begun == 1  # no second sync beside the first
    store.gate.set()
    await stopping
    assert store.begun == 2 and entry.account.held == 0 and shared.taken[entry.name] == 0


async def test_tend_looks_past_an_account_that_is_syncing() -> None:
    shared, clock = SharedCounters(), Clock()
    store = Gated(shared, "p1")
    lease = Leaser(store, clock=clock, wall=lambda: WALL)  # type: ignore[arg-type]
    busy = lease.entry(limit(), WALL)
    busy.account.pending = 5
    lease._start_sync(busy)  # first in order, and stuck
    rate = lease.entry(limit(LimitKind.REQUESTS_PER_MINUTE, 60), WALL)
    rate.account.held = 5.0
    clock.now += 2.0  # idle: its 5 go back
    lease.tend(clock.now)
    assert rate.syncing is not None
    await rate.syncing
    assert shared.levels[rate.name] == 60 and rate.account.held == 0
    store.gate.set()
    assert busy.syncing is not None
    await busy.syncing


async def test_a_callers_limit_and_a_models_limit_apply_to_their_calls() -> None:
    mini = dataclasses.replace(USER, model="gpt-4o-mini")
    p = policy(index((CALLER, RPM, 1), (mini, LimitKind.TOKENS_PER_DAY, 150)), leaser(SharedCounters()))
    await p.admit(call())
    refused = await refusal(p)
    assert [v.subject for v in refused.violations] == [
        "caller:acme/billing",
        "user:acme/u1/model:gpt-4o-mini",
    ]


async def test_the_estimate_is_of_the_request_itself() -> None:
    p = policy(index((USER, LimitKind.TOKENS_PER_DAY, 1000)), leaser(SharedCounters()))
    two = dataclasses.replace(call(), messages=(ChatMessage("user", "hi"), ChatMessage("user", "again")))
    (allowance,) = (await p.admit(two)).allowances
    assert allowance.remaining == 1000 - (20 + 90)


async def test_an_unpriced_model_refused_by_spend_is_also_refused_by_spent_tokens() -> None:
    idx = index((USER, LimitKind.SPEND_PER_DAY, 10**9), (USER, LimitKind.TOKENS_PER_DAY, 100))
    lease = leaser(SharedCounters())
    p = policy(idx, lease)
    tokens_only = policy(index((USER, LimitKind.TOKENS_PER_DAY, 100)), lease)
    (await tokens_only.admit(call(model="no-such-model"))).settle(record(100))
    refused = await refusal(p, call(model="no-such-model"))
    assert [v.description.split(":")[0] for v in refused.violations] == [
        "limit of 1000000000 micro-dollars per day (UTC)",
        "limit of 100 tokens per day (UTC) reached (this call needs 100)",
    ]


async def test_spend_settles_to_the_cost_recorded() -> None:
    p = policy(index((USER, LimitKind.SPEND_PER_DAY, 10_000)), leaser(SharedCounters()))
    (await p.admit(call())).settle(record(100, 7))
    (allowance,) = (await p.admit(call())).allowances
    reservation = default_table().cost("gpt-4o-mini", TokenUsage(10, 90)).usd_micros
    assert reservation is not None
    assert allowance.remaining == 10_000 - 7 - reservation


async def test_a_monthly_budget_spent_gives_no_retry_even_when_one_call_fits() -> None:
    reservation = default_table().cost("gpt-4o-mini", TokenUsage(10, 90)).usd_micros
    assert reservation is not None
    p = policy(index((USER, LimitKind.SPEND_PER_MONTH, reservation + 1)), leaser(SharedCounters()))
    await p.admit(call())
    refused = await refusal(p)
    assert refused.reason == "SPEND_PER_MONTH_EXCEEDED" and refused.retry_after is None
    assert refused.violations[0].description.endswith(f"reached (this call needs {reservation})")


async def test_a_call_waits_once_for_all_its_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    store, clock = Gated(SharedCounters(), "p1"), Clock()
    lease = Leaser(store, tuning=EngineTuning(wait_s=0.05), clock=clock, wall=lambda: WALL)  # type: ignore[arg-type]
    idx = index((TENANT, LimitKind.TOKENS_PER_DAY, 1000), (USER, LimitKind.TOKENS_PER_DAY, 1000))
    p = LimitPolicy(Table(idx), lease, Estimator(), default_table(), clock=clock)  # type: ignore[arg-type]
    waits: list[float | None] = []
    wait_for = asyncio.wait_for

    async def recording(aw: asyncio.Future[None], timeout: float | None) -> None:
        waits.append(timeout)
        clock.now += 0.05  # the first wait uses up the call's time
        await wait_for(aw, timeout)

    monkeypatch.setattr(asyncio, "wait_for", recording)
    await wait_for(refusal(p, call(max_tokens=90)), 5.0)  # bounded, whatever happens
    assert waits == [pytest.approx(0.05), 0.001]  # the second limit has no time left
    store.gate.set()
