"""UsageStore settling attempts of a caller-supplied request id: one row, roll-up to match."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from chatgate_server.domain import Cost, Outcome, TokenUsage, UsageRecord
from chatgate_server.usage.pricing import cost_of
from chatgate_server.usage.store import UsageStore

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
FP = "ab" * 16


@pytest.fixture
async def store(migrated_database_url: str) -> AsyncIterator[UsageStore]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        migrated_database_url, min_size=2, max_size=4, open=False
    )
    await pool.open(wait=True)
    try:
        yield UsageStore(pool)
    finally:
        await pool.close()


def attempt(tenant: str, request_id: str, *, served: bool, at: timedelta) -> UsageRecord:
    usage = TokenUsage(
        input_tokens=100, output_tokens=40 if served else 0, source="reported" if served else "estimated"
    )
    return UsageRecord(
        request_id=f"{tenant}-{request_id}",  # ids are global: keep each test's apart
        tenant=tenant,
        caller_service="svc",
        user_id="u",
        requested_model="gpt-4o",
        resolved_model="gpt-4o-2024-08-06" if served else None,
        upstream_response_id="chatcmpl-1" if served else None,
        usage=usage,
        cost=cost_of("gpt-4o", usage),
        outcome=Outcome.COMPLETED if served else Outcome.UPSTREAM_ERROR,
        grpc_status="OK" if served else "UNAVAILABLE",
        finish_reason="stop" if served else None,
        attempts=1,
        time_to_first_token_ms=None,
        duration_ms=5.0,
        started_at=T0 + at,
        request_fingerprint=FP,
    )


def state(url: str, tenant: str) -> tuple[list[tuple[Any, ...]], tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT split_part(request_id, '-', 3), outcome, total_tokens FROM usage_records"
            " WHERE tenant = %s ORDER BY 1",
            [tenant],
        ).fetchall()
        daily = conn.execute(
            "SELECT sum(requests), sum(total_tokens), sum(cost_usd_micros)"
            " FROM usage_daily WHERE tenant = %s",
            [tenant],
        ).fetchone()
    assert daily is not None
    return rows, tuple(daily)


@pytest.fixture
def tenant() -> str:
    return f"attempts-{uuid.uuid4().hex[:10]}"


async def test_a_served_retry_replaces_the_failed_attempt_in_rows_and_roll_up(
    store: UsageStore, migrated_database_url: str, tenant: str
) -> None:
    failed = attempt(tenant, "r1", served=False, at=timedelta(0))
    retry = attempt(tenant, "r1", served=True, at=timedelta(seconds=2))
    assert await store.insert([failed]) == 1
    assert await store.insert([retry]) == 1
    rows, daily = state(migrated_database_url, tenant)
    assert rows == [("r1", "completed", 140)]
    assert daily == (1, 140, retry.cost.usd_micros)


async def test_the_failed_attempt_replayed_late_is_dropped(
    store: UsageStore, migrated_database_url: str, tenant: str
) -> None:
    failed = attempt(tenant, "r1", served=False, at=timedelta(0))
    retry = attempt(tenant, "r1", served=True, at=timedelta(seconds=2))
    assert await store.insert([retry]) == 1
    assert await store.insert([failed, retry]) == 0  # a spool replay, in any order
    rows, daily = state(migrated_database_url, tenant)
    assert rows == [("r1", "completed", 140)]
    assert daily == (1, 140, retry.cost.usd_micros)


async def test_generated_ids_are_untouched_by_settling(
    store: UsageStore, migrated_database_url: str, tenant: str
) -> None:
    keyed = attempt(tenant, "r1", served=True, at=timedelta(0))
    plain = replace(attempt(tenant, "r2", served=False, at=timedelta(0)), request_fingerprint=None)
    assert await store.insert([keyed, plain]) == 2
    rows, _ = state(migrated_database_url, tenant)
    assert [r[0] for r in rows] == ["r1", "r2"]


async def test_writers_racing_on_one_id_leave_one_row(
    store: UsageStore, migrated_database_url: str, tenant: str
) -> None:
    # The live writer and a replay (or two replicas) settle the same ids at once.
    for i in range(20):
        rid = f"race-{i}"
        failed = attempt(tenant, rid, served=False, at=timedelta(0))
        retry = attempt(tenant, rid, served=True, at=timedelta(seconds=1))
        await asyncio.gather(store.insert([failed]), store.insert([retry]), store.insert([failed]))
    rows, daily = state(migrated_database_url, tenant)
    assert [(r[1], r[2]) for r in rows] == [("completed", 140)] * 20
    assert daily[:2] == (20, 20 * 140)


async def test_an_unpriced_failed_attempt_leaves_no_unpriced_count_behind(
    store: UsageStore, migrated_database_url: str, tenant: str
) -> None:
    failed = replace(attempt(tenant, "r1", served=False, at=timedelta(0)), cost=Cost(None, "v"))
    retry = attempt(tenant, "r1", served=True, at=timedelta(seconds=1))
    await store.insert([failed])
    await store.insert([retry])
    with psycopg.connect(migrated_database_url) as conn:
        row = conn.execute(
            "SELECT sum(requests), sum(unpriced_requests) FROM usage_daily WHERE tenant = %s", [tenant]
        ).fetchone()
    assert row == (1, 0)
