"""UsageStore on real Postgres: batches, replays, the daily roll-up, partitions.

The session database is shared with other tests, so every test works under tenants of
its own and looks only at those.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from chatgate_server.domain import Cost, CostBasis, Outcome, TokenUsage, UsageRecord
from chatgate_server.usage.migrate import apply_migrations
from chatgate_server.usage.partitions import create_partition, ensure_partitions
from chatgate_server.usage.pricing import PRICE_VERSION, cost_of
from chatgate_server.usage.store import UsageStore

Pool = AsyncConnectionPool[AsyncConnection[Any]]


@pytest.fixture(scope="session")
def ledger_url(database_url: str) -> str:
    apply_migrations(database_url)
    return database_url


@pytest.fixture
async def pool(ledger_url: str) -> AsyncIterator[Pool]:
    p: Pool = AsyncConnectionPool(ledger_url, min_size=4, max_size=8, open=False)
    await p.open(wait=True, timeout=10)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def store(pool: Pool) -> UsageStore:
    return UsageStore(pool)


@pytest.fixture
def tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:10]}"


NOW = datetime.now(UTC).replace(microsecond=123456)


def make_record(tenant: str, **overrides: Any) -> UsageRecord:
    usage = TokenUsage(input_tokens=1200, output_tokens=340, cached_input_tokens=200, reasoning_tokens=100)
    record = UsageRecord(
        request_id=f"req-{uuid.uuid4().hex}",
        tenant=tenant,
        caller_service="billing-svc",
        user_id="user-1",
        requested_model="gpt-4o",
        resolved_model="gpt-4o-2024-08-06",
        upstream_response_id="chatcmpl-abc123",
        usage=usage,
        cost=cost_of("gpt-4o-2024-08-06", usage),
        outcome=Outcome.COMPLETED,
        grpc_status="OK",
        finish_reason="stop",
        attempts=1,
        time_to_first_token_ms=123.456,
        duration_ms=2345.678,
        started_at=NOW,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        tags={"team": "search", "feature": "summaries"},
        credential_id="abcdefghijklmnop",
        service_tier="flex",
    )
    return replace(record, **overrides)


def expected_row(r: UsageRecord) -> dict[str, Any]:
    """What the row for ``r`` must hold, written out independently of store.py."""
    return {
        "request_id": r.request_id,
        "tenant": r.tenant,
        "caller_service": r.caller_service,
        "credential_id": r.credential_id,
        "deployment": r.deployment,
        "service_tier": r.service_tier,
        "fallback_model": r.fallback_model,
        "user_id": r.user_id,
        "requested_model": r.requested_model,
        "resolved_model": r.resolved_model,
        "upstream_response_id": r.upstream_response_id,
        "input_tokens": r.usage.input_tokens,
        "output_tokens": r.usage.output_tokens,
        "cached_input_tokens": r.usage.cached_input_tokens,
        "reasoning_tokens": r.usage.reasoning_tokens,
        "total_tokens": r.usage.total_tokens,
        "cost_usd_micros": r.cost.usd_micros,
        "usage_source": r.usage.source,
        "estimate_encoding": r.usage.estimate_encoding,
        "price_version": r.cost.price_version,
        "cost_basis": r.cost.basis.value if r.cost.basis else None,
        "outcome": r.outcome.value,
        "grpc_status": r.grpc_status,
        "finish_reason": r.finish_reason,
        "attempts": r.attempts,
        "ttft_ms": r.time_to_first_token_ms,
        "duration_ms": r.duration_ms,
        "started_at": r.started_at,
        "trace_id": r.trace_id,
        "tags": dict(r.tags),
        "request_fingerprint": None
        if r.request_fingerprint is None
        else bytes.fromhex(r.request_fingerprint),
    }


async def rollup(pool: Pool, tenant: str) -> dict[tuple[str, date, str], dict[str, int]]:
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT * FROM usage_daily WHERE tenant = %s", [tenant])
        rows = await cur.fetchall()
    return {
        (r["user_id"], r["day"], r["model"]): {
            k: v for k, v in r.items() if k not in ("tenant", "user_id", "day", "model")
        }
        for r in rows
    }


def expected_rollup(records: list[UsageRecord]) -> dict[tuple[str, date, str], dict[str, int]]:
    """The roll-up computed in Python: UTC day, requested model, priced costs only."""
    out: dict[tuple[str, date, str], dict[str, int]] = defaultdict(
        lambda: dict.fromkeys(
            (
                "requests",
                "input_tokens",
                "output_tokens",
                "cached_input_tokens",
                "reasoning_tokens",
                "total_tokens",
                "cost_usd_micros",
                "unpriced_requests",
            ),
            0,
        )
    )
    for r in records:
        acc = out[(r.user_id, r.started_at.astimezone(UTC).date(), r.requested_model)]
        acc["requests"] += 1
        acc["input_tokens"] += r.usage.input_tokens
        acc["output_tokens"] += r.usage.output_tokens
        acc["cached_input_tokens"] += r.usage.cached_input_tokens
        acc["reasoning_tokens"] += r.usage.reasoning_tokens
        acc["total_tokens"] += r.usage.total_tokens
        if r.cost.usd_micros is None:
            acc["unpriced_requests"] += 1
        else:
            acc["cost_usd_micros"] += r.cost.usd_micros
    return dict(out)


async def partition_of(pool: Pool, request_id: str) -> str:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT tableoid::regclass::text FROM usage_records WHERE request_id = %s", [request_id]
        )
        rows = await cur.fetchall()
    assert len(rows) == 1, rows
    return str(rows[0][0])


def month_start(d: datetime, months_ahead: int) -> datetime:
    index = d.year * 12 + d.month - 1 + months_ahead
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


# --- writing and reading back ---------------------------------------------------------


async def test_batch_insert_returns_count_and_rows_read_back_equal(store: UsageStore, tenant: str) -> None:
    records = [
        make_record(tenant),
        # Everything optional unknown: rejected before the upstream, estimated usage.
        make_record(
            tenant,
            user_id="user-2",
            resolved_model=None,
            upstream_response_id=None,
            usage=TokenUsage(input_tokens=57, source="estimated", estimate_encoding="o200k_base"),
            cost=Cost(usd_micros=None, price_version=PRICE_VERSION),
            outcome=Outcome.REJECTED,
            grpc_status="RESOURCE_EXHAUSTED",
            finish_reason=None,
            attempts=0,
            time_to_first_token_ms=None,
            trace_id=None,
            tags={},
        ),
        # Another time zone: the same instant must come back.
        make_record(
            tenant,
            started_at=datetime(2026, 11, 3, 18, 30, 5, 1, tzinfo=timezone(timedelta(hours=-5))),
            tags={"ünïcode": "✓", "quote": 'it\'s "quoted"'},
        ),
    ]
    before = datetime.now(UTC)

    assert await store.insert(records) == 3

    for record in records:
        row = await store.get(record.request_id)
        assert row is not None
        recorded_at = row.pop("recorded_at")
        assert row == expected_row(record)
        assert before - timedelta(seconds=5) <= recorded_at <= datetime.now(UTC) + timedelta(seconds=5)


async def test_every_outcome_can_be_stored(store: UsageStore, tenant: str) -> None:
    records = [make_record(tenant, outcome=outcome) for outcome in Outcome]
    assert await store.insert(records) == len(Outcome)
    for record in records:
        row = await store.get(record.request_id)
        assert row is not None
        assert row["outcome"] == record.outcome.value


async def test_every_cost_basis_can_be_stored(store: UsageStore, tenant: str) -> None:
    records = [
        make_record(tenant, cost=Cost(None if basis is CostBasis.PRICE_UNKNOWN else 0, "v", basis))
        for basis in [*CostBasis, None]
    ]
    assert await store.insert(records) == len(records)
    for record in records:
        row = await store.get(record.request_id)
        assert row is not None
        assert row["cost_basis"] == (record.cost.basis.value if record.cost.basis else None)


async def test_get_unknown_and_empty_batch(store: UsageStore) -> None:
    assert await store.get(f"req-{uuid.uuid4().hex}") is None
    assert await store.insert([]) == 0


async def test_naive_started_at_is_refused_before_writing(store: UsageStore, tenant: str) -> None:
    good = make_record(tenant)
    naive = make_record(tenant, started_at=datetime(2026, 11, 3, 12, 0))
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.insert([good, naive])
    assert await store.get(good.request_id) is None


async def test_nul_characters_do_not_poison_a_batch(store: UsageStore, tenant: str) -> None:
    odd = make_record(tenant, user_id="user\x00x", tags={"k\x00": "v\x00"})
    assert await store.insert([odd, make_record(tenant)]) == 2
    row = await store.get(odd.request_id)
    assert row is not None
    assert row["user_id"] == "user\ufffdx"
    assert row["tags"] == {"k\ufffd": "v\ufffd"}


# --- replays and the roll-up ---------------------------------------------------------


async def test_replayed_records_are_stored_and_counted_once(
    store: UsageStore, pool: Pool, tenant: str
) -> None:
    a, b, c = (make_record(tenant) for _ in range(3))

    assert await store.insert([a, b]) == 2
    assert await store.insert([a, b]) == 0  # the spool replays a batch already written
    assert await store.insert([b, c, a]) == 1  # partly new
    assert await store.insert([c, c]) == 0  # a duplicate inside one batch

    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM usage_records WHERE request_id = ANY(%s)",
            [[a.request_id, b.request_id, c.request_id]],
        )
        assert await cur.fetchone() == (3,)
    assert await rollup(pool, tenant) == expected_rollup([a, b, c])
    day = NOW.date()
    assert (await rollup(pool, tenant))[("user-1", day, "gpt-4o")]["requests"] == 3


async def test_duplicate_inside_one_fresh_batch_counts_once(
    store: UsageStore, pool: Pool, tenant: str
) -> None:
    d = make_record(tenant)
    assert await store.insert([d, d]) == 1
    assert await rollup(pool, tenant) == expected_rollup([d])


async def test_rollup_sums_match_the_rows(store: UsageStore, pool: Pool, tenant: str) -> None:
    rng = random.Random(7)
    users = ["alice", "bob", "carol"]
    models = ["gpt-4o", "gpt-4.1-mini", "o4-mini", "no-such-model"]
    base = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
    east = timezone(timedelta(hours=9))
    records = []
    for i in range(120):
        model = rng.choice(models)
        usage = TokenUsage(
            input_tokens=(inp := rng.randint(0, 50_000)),
            cached_input_tokens=rng.randint(0, inp),
            output_tokens=(out := rng.randint(0, 8_000)),
            reasoning_tokens=rng.randint(0, out),
        )
        # Days around midnight UTC, some expressed in UTC+9 where the local date differs.
        started = base - timedelta(days=rng.randint(0, 3), minutes=rng.randint(-90, 90), seconds=i)
        records.append(
            make_record(
                tenant,
                user_id=rng.choice(users),
                requested_model=model,
                resolved_model=None if model == "no-such-model" else f"{model}-2025-01-01",
                usage=usage,
                cost=cost_of(model, usage),
                started_at=started.astimezone(east) if i % 3 == 0 else started,
            )
        )
    # Written in uneven batches, one replayed.
    assert await store.insert(records[:7]) == 7
    assert await store.insert(records[7:80]) == 73
    assert await store.insert(records[50:90]) == 10
    assert await store.insert(records[90:]) == 30

    got = await rollup(pool, tenant)
    want = expected_rollup(records)
    assert got == want
    assert len(want) > 20  # the data really spans several users, models and days
    assert any(v["unpriced_requests"] for v in want.values())

    # And the roll-up agrees with the rows themselves.
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*), sum(total_tokens), sum(cost_usd_micros) FROM usage_records WHERE tenant = %s",
            [tenant],
        )
        rows_total = await cur.fetchone()
        cur = await conn.execute(
            "SELECT sum(requests), sum(total_tokens), sum(cost_usd_micros)"
            " FROM usage_daily WHERE tenant = %s",
            [tenant],
        )
        daily_total = await cur.fetchone()
    assert rows_total == daily_total


async def test_concurrent_overlapping_writers_neither_deadlock_nor_double_count(
    store: UsageStore, pool: Pool, tenant: str
) -> None:
    # Four writers (think: replicas, or a replay racing the live writer) write
    # overlapping batches of new rows in different orders, touching the same roll-up
    # rows. Inserting in batch order instead of key order deadlocks in most rounds.
    everything: list[UsageRecord] = []
    for round_ in range(6):
        records = [
            make_record(tenant, user_id=f"user-{i % 5}", requested_model=["gpt-4o", "gpt-5"][i % 2])
            for i in range(300)
        ]
        everything += records
        batches = []
        for w in range(4):
            batch = records[w * 50 : w * 50 + 150]
            random.Random(round_ * 10 + w).shuffle(batch)
            batches.append(batch)
        inserted = await asyncio.gather(*(store.insert(b) for b in batches))
        assert sum(inserted) == len(records)
    assert await rollup(pool, tenant) == expected_rollup(everything)


# --- partitions ------------------------------------------------------------------------


async def test_record_two_months_ahead_lands_in_its_own_partition(
    store: UsageStore, pool: Pool, tenant: str
) -> None:
    start = month_start(datetime.now(UTC), 2) + timedelta(hours=1)
    record = make_record(tenant, started_at=start)
    assert await store.insert([record]) == 1
    # Not in the safety-net default: the partition was made ahead of time.
    assert await partition_of(pool, record.request_id) == f"usage_records_{start:%Y%m}"
    assert await rollup(pool, tenant) == expected_rollup([record])


async def test_ensure_partitions_creates_months_ahead(store: UsageStore, pool: Pool) -> None:
    await store.ensure_partitions(months_ahead=7)
    async with pool.connection() as conn:
        assert await ensure_partitions(conn, months_ahead=7) == 0  # all there now
        name = f"usage_records_{month_start(datetime.now(UTC), 7):%Y%m}"
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
        assert await cur.fetchone() == (True,)


async def test_rows_outside_any_partition_use_the_default_then_move_out(
    store: UsageStore, pool: Pool, tenant: str
) -> None:
    # A month nobody created a partition for (a wrong clock, a long-lived replica).
    when = datetime(2001, 3, 15, 12, 0, tzinfo=UTC)
    early = make_record(tenant, started_at=when)
    assert await store.insert([early]) == 1
    assert await partition_of(pool, early.request_id) == "usage_records_default"

    async with pool.connection() as conn:
        assert await create_partition(conn, date(2001, 3, 1)) is True
        assert await create_partition(conn, date(2001, 3, 20)) is False
    # The row moved out of the default into its month, and deduplication still holds.
    assert await partition_of(pool, early.request_id) == "usage_records_200103"
    assert await store.insert([early]) == 0
    later = make_record(tenant, started_at=when + timedelta(days=1))
    assert await store.insert([later]) == 1
    assert await partition_of(pool, later.request_id) == "usage_records_200103"
    assert await rollup(pool, tenant) == expected_rollup([early, later])
    row = await store.get(early.request_id)
    assert row is not None
    row.pop("recorded_at")
    assert row == expected_row(early)


def test_check_constraint_refuses_an_unknown_outcome(ledger_url: str, tenant: str) -> None:
    # The schema guards the values reports group by; the store never sends these.
    with psycopg.connect(ledger_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO usage_records (request_id, started_at, tenant, caller_service, user_id,"
            " requested_model, input_tokens, output_tokens, cached_input_tokens, reasoning_tokens,"
            " total_tokens, usage_source, price_version, outcome, grpc_status, attempts, duration_ms)"
            " VALUES ('x', now(), %s, 's', 'u', 'm', 0, 0, 0, 0, 0, 'reported', 'v', 'exploded', 'OK', 1, 1)",
            [tenant],
        )
