"""UsageLedger on real Postgres behind a TCP proxy the tests cut: nothing lost, nothing twice.

Each test works under a tenant of its own; Postgres "goes away" by cutting the proxy
(the machine's server keeps running for everyone else).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from chatgate_server.domain import ChatMessage, CompletionRequest, Outcome, TokenUsage, UsageRecord
from chatgate_server.errors import LedgerFull
from chatgate_server.usage.ledger import LedgerState, UsageLedger
from chatgate_server.usage.pricing import cost_of
from chatgate_server.usage.spool import DEAD_LETTER_FILE, Spool, decode_lines
from chatgate_server.usage.store import UsageStore
from tests.databases import throwaway_database
from tests.integration.pgproxy import PgProxy, running_proxy


@pytest.fixture
async def proxy(migrated_database_url: str) -> AsyncIterator[PgProxy]:
    async with running_proxy(migrated_database_url) as p:
        yield p


@pytest.fixture
def tenant() -> str:
    return f"ledger-{uuid.uuid4().hex[:10]}"


def make_record(tenant: str, n: int = 0, **overrides: Any) -> UsageRecord:
    usage = TokenUsage(input_tokens=100 + n, output_tokens=20 + n, cached_input_tokens=10, reasoning_tokens=5)
    r = UsageRecord(
        request_id=f"req-{uuid.uuid4().hex}",
        tenant=tenant,
        caller_service="svc",
        user_id=f"user-{n % 3}",
        requested_model="gpt-4o-mini",
        resolved_model="gpt-4o-mini-2024-07-18",
        upstream_response_id="chatcmpl-x",
        usage=usage,
        cost=cost_of("gpt-4o-mini", usage),
        outcome=Outcome.COMPLETED,
        grpc_status="OK",
        finish_reason="stop",
        attempts=1,
        time_to_first_token_ms=10.0,
        duration_ms=50.0,
        started_at=datetime.now(UTC),
    )
    return replace(r, **overrides)


def rows_and_rollup(url: str, tenant: str) -> tuple[dict[str, int], tuple[int, int, int]]:
    """request_id → row count, and (requests, total_tokens, cost) summed from usage_daily."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT request_id, count(*) FROM usage_records WHERE tenant = %s GROUP BY 1", [tenant]
        ).fetchall()
        daily = conn.execute(
            "SELECT coalesce(sum(requests), 0), coalesce(sum(total_tokens), 0),"
            " coalesce(sum(cost_usd_micros), 0) FROM usage_daily WHERE tenant = %s",
            [tenant],
        ).fetchone()
    assert daily is not None
    return {str(r): int(c) for r, c in rows}, (int(daily[0]), int(daily[1]), int(daily[2]))


def expected_rollup(records: list[UsageRecord]) -> tuple[int, int, int]:
    return (
        len(records),
        sum(r.usage.total_tokens for r in records),
        sum(r.cost.usd_micros or 0 for r in records),
    )


@asynccontextmanager
async def running_ledger(url: str, spool_dir: Path, **options: Any) -> AsyncIterator[UsageLedger]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url, min_size=1, max_size=4, open=False, reconnect_timeout=0.5
    )
    await pool.open(wait=False)
    spool = Spool(spool_dir, max_bytes=options.pop("spool_max_bytes", 100 * 1024 * 1024))
    spool.open()
    options = {"write_timeout_s": 1.0, "retry_base_s": 0.05, "retry_cap_s": 0.2, **options}
    ledger = UsageLedger(UsageStore(pool), spool, **options)
    ledger.start()
    try:
        yield ledger
    finally:
        await ledger.close()
        spool.close()
        await pool.close()


def files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def poll(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait (in a thread) until ``condition()``; fail after ``timeout_s`` rather than hang."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


async def stored(ledger: UsageLedger) -> None:
    """Wait until everything submitted is in Postgres (bounded, so a bug fails, not hangs)."""
    async with asyncio.timeout(30):
        await ledger.wait_stored()


async def test_the_same_record_submitted_twice_is_one_row(
    migrated_database_url: str, tmp_path: Path, tenant: str
) -> None:
    record = make_record(tenant)
    async with running_ledger(migrated_database_url, tmp_path) as ledger:
        ledger.submit(record)
        ledger.submit(record)
        await stored(ledger)
        ledger.submit(record)  # and once more, in a later batch
        await stored(ledger)
    rows, rollup = rows_and_rollup(migrated_database_url, tenant)
    assert rows == {record.request_id: 1}
    assert rollup == expected_rollup([record])


async def test_an_outage_spools_every_record_and_postgres_back_stores_each_once(
    migrated_database_url: str, proxy: PgProxy, tmp_path: Path, tenant: str
) -> None:
    states: list[LedgerState] = []
    before = [make_record(tenant, n) for n in range(20)]
    during = [make_record(tenant, n) for n in range(20, 420)]
    async with running_ledger(proxy.url_for(migrated_database_url), tmp_path) as ledger:
        ledger.add_listener(states.append)
        for r in before:
            ledger.submit(r)
        await stored(ledger)

        proxy.cut()
        # Records keep arriving in bursts, as finished requests would, plus a replay of
        # rows that are already stored.
        for start in range(0, len(during), 50):
            for r in during[start : start + 50]:
                ledger.submit(r)
            await asyncio.sleep(0)
        for r in before[:5]:
            ledger.submit(r)
        await ledger.flush()

        stats = ledger.stats()
        assert stats.state is LedgerState.SPOOLING
        assert not stats.postgres_ok
        assert stats.spooled_records == len(during) + 5
        assert stats.queued == 0
        rows, _ = rows_and_rollup(migrated_database_url, tenant)
        assert len(rows) == len(before)  # nothing of the outage reached Postgres yet

        proxy.restore()
        await stored(ledger)
        assert ledger.stats().spooled_records == 0
        assert ledger.state is LedgerState.OK
    rows, rollup = rows_and_rollup(migrated_database_url, tenant)
    everything = before + during
    assert rows == {r.request_id: 1 for r in everything}
    assert rollup == expected_rollup(everything)
    assert states[:2] == [LedgerState.SPOOLING, LedgerState.OK]
    assert not files(tmp_path, "slot-*/segment-*")  # drained segments are removed


async def test_postgres_dropping_mid_batch_loses_nothing(
    migrated_database_url: str, proxy: PgProxy, tmp_path: Path, tenant: str
) -> None:
    # Cut and restore while batches are being written: whatever committed and whatever
    # was spooled (possibly both, when a commit's answer was lost) ends up stored once.
    records = [make_record(tenant, n) for n in range(3000)]
    toggles = {5: proxy.cut, 12: proxy.restore, 20: proxy.cut, 26: proxy.restore}
    async with running_ledger(proxy.url_for(migrated_database_url), tmp_path, batch_size=50) as ledger:
        for burst in range(30):
            for r in records[burst * 100 : (burst + 1) * 100]:
                ledger.submit(r)
            if burst in toggles:
                toggles[burst]()
            await asyncio.sleep(0.005)  # the writer runs meanwhile: cuts land mid-insert
        await stored(ledger)
        stats = ledger.stats()
    # The outage was real (an interrupted replay is repeated, so replays can exceed spools).
    assert stats.spooled > 0 and stats.replayed >= stats.spooled
    rows, rollup = rows_and_rollup(migrated_database_url, tenant)
    assert rows == {r.request_id: 1 for r in records}
    assert rollup == expected_rollup(records)


async def test_a_record_postgres_refuses_is_dead_lettered_and_the_rest_are_written(
    migrated_database_url: str, tmp_path: Path, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = [make_record(tenant, n) for n in range(10)]
    bad = make_record(tenant, usage=TokenUsage(input_tokens=-1))  # the schema's CHECK refuses it
    async with running_ledger(migrated_database_url, tmp_path) as ledger:
        with caplog.at_level(logging.ERROR, logger="chatgate_server.usage.ledger"):
            for r in [*good[:5], bad, *good[5:]]:
                ledger.submit(r)
            await stored(ledger)
        assert ledger.stats().dead_lettered == 1
        dead = files(tmp_path, f"slot-*/{DEAD_LETTER_FILE}")
    rows, _ = rows_and_rollup(migrated_database_url, tenant)
    assert rows == {r.request_id: 1 for r in good}
    assert len(dead) == 1
    assert [r.request_id for r in decode_lines(dead[0].read_bytes(), "dead")] == [bad.request_id]
    assert bad.request_id in caplog.text


def request() -> CompletionRequest:
    return CompletionRequest(
        request_id="r", model="gpt-4o-mini", messages=(ChatMessage("user", "hi"),), user_id="u"
    )


async def test_with_queue_and_spool_full_new_calls_are_refused_until_postgres_returns(
    migrated_database_url: str, proxy: PgProxy, tmp_path: Path, tenant: str
) -> None:
    records = [make_record(tenant, n) for n in range(12)]
    async with running_ledger(
        proxy.url_for(migrated_database_url), tmp_path, queue_size=4, spool_max_bytes=1, batch_size=2
    ) as ledger:
        await ledger.admit(request())
        full = asyncio.Event()
        ledger.add_listener(lambda state: full.set() if state is LedgerState.FULL else None)
        proxy.cut()
        for r in records:
            ledger.submit(r)  # calls already admitted: never refused, never dropped
        async with asyncio.timeout(30):
            await full.wait()
        with pytest.raises(LedgerFull) as refused:
            await ledger.admit(request())
        assert refused.value.status_name == "UNAVAILABLE"
        assert ledger.stats().spooled_records >= 1  # the spool took what fit

        proxy.restore()
        await stored(ledger)
        await ledger.admit(request())  # accepting again
    rows, rollup = rows_and_rollup(migrated_database_url, tenant)
    assert rows == {r.request_id: 1 for r in records}
    assert rollup == expected_rollup(records)


async def test_a_spool_left_by_an_earlier_process_is_replayed_at_start_torn_line_and_all(
    migrated_database_url: str, proxy: PgProxy, tmp_path: Path, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    records = [make_record(tenant, n) for n in range(50)]
    proxy.cut()
    async with running_ledger(proxy.url_for(migrated_database_url), tmp_path, postgres_ok=False) as first:
        for r in records:
            first.submit(r)
        await first.flush()
        assert first.stats().spooled_records == len(records)
    # The process died while writing one more line.
    (segment,) = files(tmp_path, "slot-*/segment-*")
    with segment.open("ab") as f:
        f.write(b'0badc0de {"v": 1, "request_id": "torn')

    with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.spool"):
        async with running_ledger(migrated_database_url, tmp_path) as second:
            await stored(second)
    assert "torn last line" in caplog.text
    rows, rollup = rows_and_rollup(migrated_database_url, tenant)
    assert rows == {r.request_id: 1 for r in records}
    assert rollup == expected_rollup(records)


# --- partitions keep coming while the service runs ----------------------------------------


@pytest.fixture
def fresh_db() -> Iterator[str]:
    with throwaway_database(os.environ["DATABASE_URL"], "chatgate_part", migrate=True) as url:
        yield url


async def test_partitions_are_created_ahead_while_running(fresh_db: str, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    index = now.year * 12 + now.month - 1 + 3
    name = f"usage_records_{index // 12:04d}{index % 12 + 1:02d}"

    def exists() -> bool:
        with psycopg.connect(fresh_db) as conn:
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [name]).fetchone()
            return bool(row and row[0])

    assert exists()
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(f'DROP TABLE "{name}"')  # as if the month had come round since start-up
    async with running_ledger(fresh_db, tmp_path, partition_interval_s=0.05) as ledger:
        await asyncio.to_thread(poll, exists)
        record = make_record(
            "t",
            started_at=datetime.combine(
                (now.replace(day=1) + timedelta(days=31 * 3)).replace(day=2).date(),
                datetime.min.time(),
                tzinfo=UTC,
            ),
        )
        ledger.submit(record)
        await stored(ledger)
    with psycopg.connect(fresh_db) as conn:
        row = conn.execute(
            "SELECT tableoid::regclass::text FROM usage_records WHERE request_id = %s", [record.request_id]
        ).fetchone()
    assert row == (name,)


async def test_rows_spooled_while_postgres_was_away_are_stored_at_exit_if_it_answers(
    migrated_database_url: str, proxy: PgProxy, tmp_path: Path, tenant: str
) -> None:
    """A replica that is stopped (scaled down, rolled) may never start on its volume
    again: what it spooled must reach Postgres at exit when Postgres answers by then."""
    records = [make_record(tenant, n) for n in range(50)]
    # A slow replayer (its first retry 30 s away), so only the exit can store the spool.
    async with running_ledger(
        proxy.url_for(migrated_database_url), tmp_path, retry_base_s=30.0, retry_cap_s=30.0
    ) as ledger:
        proxy.cut()
        for r in records:
            ledger.submit(r)
        await ledger.flush()
        assert ledger.stats().spooled_records == len(records)
        proxy.restore()
    rows, rollup = rows_and_rollup(migrated_database_url, tenant)
    assert rows == {r.request_id: 1 for r in records}
    assert rollup == expected_rollup(records)
    assert not files(tmp_path, "slot-*/segment-*")
