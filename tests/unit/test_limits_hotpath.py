"""What the limits' hot path keeps between calls stays right: the per-limit-set plan is
dropped when the table reloads, each call's allowances are computed afresh (remaining
and reset time exact after every reservation), only the tightest limit of each kind is
reported, and the capped request equals the one dataclasses.replace would give."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from chatgate.v1 import chat_pb2 as pb
from chatgate_server.completion import StreamStarted
from chatgate_server.domain import (
    Caller,
    ChatMessage,
    CompletionRequest,
    JsonSchemaFormat,
    LimitKind,
    SamplingOptions,
    TokenUsage,
    ToolSpec,
)
from chatgate_server.errors import QuotaExceeded
from chatgate_server.limits.buckets import BucketAccount, BucketTake
from chatgate_server.limits.definitions import Definition, Scope, Target
from chatgate_server.limits.engine import Leaser
from chatgate_server.limits.leases import PoolGrant, PoolSync
from chatgate_server.limits.policy import LimitPolicy, _evolve
from chatgate_server.limits.table import LimitTable
from chatgate_server.rpc.convert import to_proto
from chatgate_server.usage.pricing import default_table
from chatgate_server.usage.tokens import TiktokenEstimator, _encoding, count_tokens

WALL = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
TENANT = Target(Scope.TENANT, "acme")
USER = Target(Scope.USER, "acme", "u1")


class Counters:
    """One holder's shared counters: a pool grants what is left of its amount; a
    bucket's level stands still (the test's clock does too)."""

    ttl_s = 10.0
    statements = 0

    def __init__(self) -> None:
        self.taken: dict[str, int] = {}
        self.levels: dict[str, float] = {}

    async def pool_sync(self, pool: str, ends_at: datetime | None, amount: int, sync: PoolSync) -> PoolGrant:
        taken = self.taken.get(pool, 0) - sync.back
        grant = min(sync.want, amount - taken)
        self.taken[pool] = taken + grant
        return PoolGrant(self.taken[pool], grant, amount - self.taken[pool])

    async def bucket_take(
        self, bucket: str, capacity: float, per_s: float, take: BucketTake
    ) -> tuple[int, float]:
        level = min(capacity, self.levels.get(bucket, capacity) + take.back)
        grant = min(take.want, int(level))
        self.levels[bucket] = level - grant
        return grant, level - grant


class Store:
    def __init__(self, rows: list[Definition]) -> None:
        self.rows, self.version_now = rows, 1

    async def version(self) -> int:
        return self.version_now

    async def definitions(self) -> list[Definition]:
        return list(self.rows)


class Estimator:
    def estimate(self, request: CompletionRequest, relayed: object) -> TokenUsage:
        return TokenUsage(input_tokens=10, source="estimated")


def policy(table: LimitTable, clock: list[float]) -> LimitPolicy:
    leaser = Leaser(Counters(), clock=lambda: clock[0], wall=lambda: WALL)  # type: ignore[arg-type]
    return LimitPolicy(
        table,
        leaser,
        Estimator(),
        default_table(),
        max_completion_tokens=90,
        clock=lambda: clock[0],
        wall=lambda: WALL,
    )


async def loaded(*rows: Definition) -> tuple[LimitTable, Store]:
    store = Store(list(rows))
    table = LimitTable(store, clock=lambda: WALL)  # type: ignore[arg-type]
    assert await table.refresh()
    return table, store


def call(max_tokens: int | None = None) -> CompletionRequest:
    return CompletionRequest(
        "r",
        "gpt-4o-mini",
        (ChatMessage("user", "hi"),),
        "u1",
        caller=Caller("acme", "billing"),
        sampling=SamplingOptions(max_completion_tokens=max_tokens),
    )


async def test_a_reload_replaces_the_plan_of_a_limit_set() -> None:
    table, store = await loaded(Definition(USER, LimitKind.TOKENS_PER_DAY, 1000))
    p = policy(table, [0.0])
    first = await p.admit(call())
    assert first.amend(call()).sampling.max_completion_tokens == 90  # a token limit: capped

    store.rows = [Definition(USER, LimitKind.REQUESTS_PER_MINUTE, 1)]
    store.version_now = 2
    assert await table.refresh()

    second = await p.admit(call())
    assert second.amend(call()).sampling.max_completion_tokens is None  # no token limit now
    assert [(a.kind, a.limit) for a in second.allowances] == [(LimitKind.REQUESTS_PER_MINUTE, 1)]
    with pytest.raises(QuotaExceeded):  # the new amount holds, not the old set's
        await p.admit(call())


async def test_a_reload_with_a_new_amount_is_used_by_the_next_call() -> None:
    table, store = await loaded(Definition(USER, LimitKind.TOKENS_PER_DAY, 1000))
    p = policy(table, [0.0])
    await p.admit(call())  # reserves 100
    store.rows = [Definition(USER, LimitKind.TOKENS_PER_DAY, 150)]
    store.version_now = 2
    await table.refresh()
    with pytest.raises(QuotaExceeded):
        await p.admit(call())  # 100 held + 100 more > 150


async def test_remaining_and_reset_are_exact_after_each_reservation() -> None:
    table, _ = await loaded(
        Definition(USER, LimitKind.REQUESTS_PER_MINUTE, 60), Definition(USER, LimitKind.TOKENS_PER_DAY, 1000)
    )
    clock = [0.0]
    p = policy(table, clock)
    seen, levels = [], []
    for _ in range(3):
        ticket = await p.admit(call())
        seen.append({a.kind: (a.remaining, a.resets_at) for a in ticket.allowances})
        bucket = next(e.account for e, _ in ticket._held if isinstance(e.account, BucketAccount))  # type: ignore[attr-defined]
        levels.append(bucket.level_now(clock[0]))
        clock[0] += 0.5
    midnight = WALL.replace(hour=0) + timedelta(days=1)
    assert [s[LimitKind.TOKENS_PER_DAY] for s in seen] == [(900, midnight), (800, midnight), (700, midnight)]
    assert [s[LimitKind.REQUESTS_PER_MINUTE][0] for s in seen] == [59, 58, 57]
    # Full again when the shared bucket has refilled (one a second), as of each call
    # (the level moves between calls: refills, syncs), never a value kept from before.
    resets = [s[LimitKind.REQUESTS_PER_MINUTE][1] for s in seen]
    assert resets == [WALL + timedelta(seconds=60 - level) for level in levels]


async def test_only_the_tightest_limit_of_each_kind_is_reported() -> None:
    table, _ = await loaded(
        Definition(TENANT, LimitKind.TOKENS_PER_DAY, 10_000),
        Definition(USER, LimitKind.TOKENS_PER_DAY, 150),
        Definition(TENANT, LimitKind.CONCURRENT_STREAMS, 5),
        Definition(USER, LimitKind.CONCURRENT_STREAMS, 5),
    )
    ticket = await policy(table, [0.0]).admit(call())
    reported = [(a.subject, a.kind, a.remaining) for a in ticket.allowances]
    assert reported == [
        ("user:acme/u1", LimitKind.TOKENS_PER_DAY, 50),  # 150 - 100, not the tenant's 9,900
        ("tenant:acme", LimitKind.CONCURRENT_STREAMS, 4),  # a tie: the first (the tenant's)
    ]


def test_the_capped_request_is_what_dataclasses_replace_gives() -> None:
    """Every field is carried over (a field added later too): _evolve copies them all."""
    request = CompletionRequest(
        request_id="r-9",
        model="gpt-4o",
        messages=(ChatMessage("user", "hi"),),
        user_id="u",
        caller=Caller("acme", "billing"),
        tags={"team": "x"},
        sampling=SamplingOptions(temperature=0.5, top_p=0.9, stop=("END",), seed=7, logprobs=True),
        tools=(ToolSpec("f", "does f", {"type": "object"}),),
        parallel_tool_calls=False,
        response_format=JsonSchemaFormat("s", {"type": "object"}),
        request_id_from_caller=True,
        service_tier="flex",
        prompt_cache_key="k",
    )
    expected = dataclasses.replace(
        request, sampling=dataclasses.replace(request.sampling, max_completion_tokens=90)
    )
    capped = _evolve(request, "sampling", _evolve(request.sampling, "max_completion_tokens", 90))
    assert capped == expected and type(capped) is CompletionRequest


def test_a_started_event_without_allowances_is_still_a_started_event() -> None:
    response = to_proto(StreamStarted("", "", "", ()))
    assert response.WhichOneof("event") == "started"
    assert list(response.started.allowances) == []
    assert pb.CompleteResponse.FromString(response.SerializeToString()).HasField("started")


def test_short_strings_count_as_the_tokenizer_says_cached_or_not() -> None:
    for text in ("user", "assistant", "a" * 16, "a" * 17, "Say something, one word per chunk."):
        for _ in range(2):  # counted, then (if short) from the cache
            assert count_tokens(text, "o200k_base") == len(_encoding("o200k_base").encode(text))


def test_the_input_count_admission_uses_is_the_estimates_input() -> None:
    estimator = TiktokenEstimator()
    long = "word " * 5000  # past the sampled characters: extrapolated alike
    for request in (
        call(),
        dataclasses.replace(
            call(), messages=(ChatMessage("system", long), ChatMessage("user", "hi", name="ann"))
        ),
        dataclasses.replace(call(), tools=(ToolSpec("lookup", "finds", {"type": "object"}),)),
    ):
        assert estimator.input_tokens(request) == estimator.estimate(request, ()).input_tokens
        assert estimator.estimate(request, ("Hello", " there")).output_tokens == 2


async def test_a_table_with_only_applicable_is_enough() -> None:
    """The policy asks the table for nothing but ``applicable`` (fakes, other tables)."""
    table, _ = await loaded(Definition(USER, LimitKind.TOKENS_PER_DAY, 1000))

    class Bare:
        def applicable(self, tenant: str, caller: str, user: str, model: str) -> object:
            return table.applicable(tenant, caller, user, model)

    p = policy(Bare(), [0.0])  # type: ignore[arg-type]
    for remaining in (900, 800):
        (allowance,) = (await p.admit(call())).allowances
        assert allowance.remaining == remaining
