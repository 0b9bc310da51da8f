"""The abuse detector on synthetic usage history in a throwaway database, with an
injected clock: a normal user, a spike and a slow ramp; refusal bursts (rows and edge
counts); fan-out to new users; the tighten and block steps; one run per interval."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from chatgate_server.limits import anomaly_store
from chatgate_server.limits.anomaly_detector import AnomalyDetector
from chatgate_server.limits.anomaly_rules import Rule, Step
from chatgate_server.limits.anomaly_settings import DetectorSettings
from tests.databases import throwaway_database

SETTINGS = DetectorSettings(
    interval_s=0,
    spike_factor=10,
    baseline_days=7,
    token_floor=20_000,
    spend_floor_micros=10**12,  # these tests are about tokens
    refusal_burst=300,
    new_users=100,
    cooldown_s=3600,
)
DAY = 240_000  # a normal user's day: 10 000 tokens an hour on average


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    admin = os.environ.get("DATABASE_URL")
    if not admin:
        pytest.fail("DATABASE_URL is not set: run the tests with the README's test command")
    with throwaway_database(admin, "chatgate_anomaly", migrate=True) as database:
        yield database


@pytest.fixture
async def pool(url: str) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(url, min_size=1, max_size=3, open=False) as p:
        await p.open(wait=True, timeout=10)
        yield p


@pytest.fixture
def db(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


_BASE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
_TESTS = itertools.count()


def now_() -> datetime:
    """Each test's "now": near the real clock (partitions exist), and ten minutes after
    the last test's, so that runs keep moving forward (the detector's last-run row)."""
    return _BASE + timedelta(minutes=10 * next(_TESTS))


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def add_calls(
    db: psycopg.Connection[Any],
    tenant: str,
    user: str,
    *,
    at: datetime,
    calls: int = 1,
    tokens: int = 100,
    caller: str = "billing",
    outcome: str = "completed",
    status: str = "OK",
) -> None:
    """``calls`` usage rows of ``tokens`` tokens each, at ``at``."""
    db.execute(
        "INSERT INTO usage_records (started_at, input_tokens, output_tokens, cached_input_tokens,"
        " reasoning_tokens, total_tokens, cost_usd_micros, duration_ms, attempts, request_id, tenant,"
        " caller_service, user_id, requested_model, usage_source, price_version, outcome, grpc_status)"
        " SELECT %s, %s, 0, 0, 0, %s, 0, 100, 1, gen_random_uuid()::text, %s, %s, %s, 'gpt-4o-mini',"
        " 'reported', 'test', %s, %s FROM generate_series(1, %s)",
        (at, tokens, tokens, tenant, caller, user, outcome, status, calls),
    )


def add_days(db: psycopg.Connection[Any], tenant: str, user: str, per_day: list[int], today: date) -> None:
    """The daily roll-up of the days before ``today``: ``per_day[0]`` is the oldest."""
    for back, tokens in zip(range(len(per_day), 0, -1), per_day, strict=True):
        db.execute(
            "INSERT INTO usage_daily (day, requests, total_tokens, tenant, user_id, model)"
            " VALUES (%s, 100, %s, %s, %s, 'gpt-4o-mini')",
            (today - timedelta(days=back), tokens, tenant, user),
        )


def detector(pool: AsyncConnectionPool, clock: Clock, **overrides: Any) -> AnomalyDetector:
    from dataclasses import replace

    return AnomalyDetector(pool, replace(SETTINGS, **overrides), clock=clock)


def mine(found: list[Any] | None, acme: str) -> list[Any]:
    assert found is not None
    return [(f.subject.label, f.rule, step) for f, step in found if f.subject.tenant == acme]


async def test_a_spike_is_found_a_normal_user_and_a_slow_ramp_are_not(
    pool: AsyncConnectionPool, db: psycopg.Connection[Any], url: str, caplog: pytest.LogCaptureFixture
) -> None:
    acme, now = tenant(), now_()
    today = now.date()
    for user in ("u-normal", "u-spike"):
        add_days(db, acme, user, [DAY] * 7, today)
    add_calls(db, acme, "u-normal", at=now - timedelta(minutes=20), calls=30, tokens=1_000)  # 3x usual
    add_calls(db, acme, "u-spike", at=now - timedelta(minutes=20), calls=50, tokens=10_000)  # 50x usual
    # The ramp: a fifth more every day, and today's busy hour at twice today's mean hour.
    ramp = [round(DAY * 1.2**i) for i in range(7)]
    add_days(db, acme, "u-ramp", ramp, today)
    add_calls(
        db, acme, "u-ramp", at=now - timedelta(minutes=10), calls=10, tokens=round(2 * DAY * 1.2**7 / 24 / 10)
    )
    # Usage outside the hour does not count as the hour.
    add_calls(db, acme, "u-normal", at=now - timedelta(minutes=90), calls=100, tokens=10_000)

    caplog.set_level(logging.WARNING, "chatgate_server.limits.anomaly_detector")
    found = await detector(pool, Clock(now)).run_once()
    assert mine(found, acme) == [(f"user {acme}/u-spike", Rule.USAGE_SPIKE, Step.FLAG)]
    (finding, _) = next((f, s) for f, s in found or [] if f.subject.tenant == acme)
    assert finding.observed == 500_000 and finding.threshold == 100_000
    assert finding.usual == pytest.approx(10_000)
    logged = [r.getMessage() for r in caplog.records if acme in r.getMessage()]
    assert len(logged) == 1 and "usage_spike" in logged[0] and "action flag" in logged[0]

    # Found once: the next run (a minute later) does not find it again within the cooldown.
    caplog.clear()
    assert mine(await detector(pool, Clock(now + timedelta(minutes=1))).run_once(), acme) == []
    assert not [r for r in caplog.records if acme in r.getMessage()]
    # Nothing but a flag: no limits, no blocks.
    assert db.execute("SELECT count(*) FROM limits WHERE tenant = %s", (acme,)).fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM blocks WHERE tenant = %s", (acme,)).fetchone() == (0,)

    listing = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "chatgate_server", "usage", "anomalies", "--since", "2h", "--tenant", acme],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert f"user {acme}/u-spike" in listing.stdout and "usage_spike" in listing.stdout
    assert "u-normal" not in listing.stdout and "u-ramp" not in listing.stdout
    assert "1 finding(s)" in listing.stdout


async def test_a_caller_spending_through_many_users_within_their_usual_is_found(
    pool: AsyncConnectionPool, db: psycopg.Connection[Any]
) -> None:
    """A leaked caller credential: "reports" usually makes one small call a day; in the
    last hour it spent 4 000 tokens for each of twelve users, each of them far within
    their own usual hour — no user is a finding, the caller is. A caller seen for the
    first time ("batch") is not judged against a baseline it does not have."""
    acme, now = tenant(), now_()
    today = now.date()
    users = [f"u-{i}" for i in range(12)]
    for back in range(1, 8):
        day = now - timedelta(days=back)
        add_calls(db, acme, "u-0", at=day, calls=1, tokens=1_000, caller="reports")
        add_calls(db, acme, "u-1", at=day, calls=24, tokens=10_000, caller="billing")
    for user in users:
        add_days(db, acme, user, [DAY] * 7, today)
        add_calls(db, acme, user, at=now - timedelta(minutes=15), calls=4, tokens=1_000, caller="reports")
        add_calls(db, acme, user, at=now - timedelta(minutes=30), calls=1, tokens=2_000, caller="billing")
    add_calls(db, acme, "u-new", at=now - timedelta(minutes=5), calls=10, tokens=5_000, caller="batch")
    add_days(db, acme, "u-new", [DAY] * 7, today)

    found = await detector(pool, Clock(now)).run_once()
    assert mine(found, acme) == [(f"caller {acme}/reports", Rule.USAGE_SPIKE, Step.FLAG)]
    (finding, _) = next((f, s) for f, s in found or [] if f.subject.tenant == acme)
    assert finding.observed == 48_000 and finding.threshold == 20_000  # the floor: its usual is ~42/h
    assert "through this caller" in finding.detail


async def test_callers_baselines_too_slow_to_read_leave_the_rest_of_the_run_whole(
    pool: AsyncConnectionPool,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Days of a busy caller's rows can take long to sum: past BASELINE_TIMEOUT the run
    goes on — the user's spike is still found and recorded — and the caller is not
    judged that day (its baseline counts as none)."""
    from chatgate_server.limits import anomaly_detector

    acme, now = tenant(), now_()
    for back in range(1, 8):
        add_calls(db, acme, "u-0", at=now - timedelta(days=back), calls=1, tokens=1_000, caller="reports")
    add_days(db, acme, "u-spike", [DAY] * 7, now.date())
    add_calls(db, acme, "u-spike", at=now - timedelta(minutes=20), calls=50, tokens=10_000, caller="reports")
    slow_read = anomaly_store.caller_baselines

    async def slow(conn: Any, *args: Any) -> Any:
        await conn.execute("SELECT pg_sleep(5)")
        return await slow_read(conn, *args)

    monkeypatch.setattr(anomaly_store, "caller_baselines", slow)
    monkeypatch.setattr(anomaly_detector, "BASELINE_TIMEOUT", "200ms")
    caplog.set_level(logging.WARNING, "chatgate_server.limits.anomaly_detector")
    found = await detector(pool, Clock(now)).run_once()
    # Without the timeout the caller, 1000x its own usual, would be found too.
    assert mine(found, acme) == [(f"user {acme}/u-spike", Rule.USAGE_SPIKE, Step.FLAG)]
    assert any("baselines took over 200ms" in r.getMessage() for r in caplog.records)
    assert db.execute("SELECT count(*) FROM anomalies WHERE tenant = %s", (acme,)).fetchone() == (1,)


async def test_a_new_user_is_found_only_above_the_floor(
    pool: AsyncConnectionPool, db: psycopg.Connection[Any]
) -> None:
    acme, now = tenant(), now_()
    add_calls(db, acme, "u-new-small", at=now - timedelta(minutes=5), calls=19, tokens=1_000)
    add_calls(db, acme, "u-new-big", at=now - timedelta(minutes=5), calls=30, tokens=1_000)
    found = await detector(pool, Clock(now)).run_once()
    assert mine(found, acme) == [(f"user {acme}/u-new-big", Rule.USAGE_SPIKE, Step.FLAG)]


async def test_refusal_bursts_count_rejected_rows_and_edge_counts_but_not_blocks(
    pool: AsyncConnectionPool, db: psycopg.Connection[Any]
) -> None:
    acme, now = tenant(), now_()
    at = now - timedelta(minutes=2)
    for user in ("u-a", "u-b", "u-c", "u-d"):  # many users' refusals: the caller's burst
        add_calls(
            db,
            acme,
            user,
            at=at,
            calls=50,
            tokens=0,
            caller="noisy",
            outcome="rejected",
            status="RESOURCE_EXHAUSTED",
        )
    # One user behind most of a caller's refusals: the finding is the user's.
    add_calls(
        db,
        acme,
        "u-hammer",
        at=at,
        calls=250,
        tokens=0,
        caller="shared",
        outcome="rejected",
        status="RESOURCE_EXHAUSTED",
    )
    add_calls(
        db,
        acme,
        "u-calm",
        at=at,
        calls=60,
        tokens=0,
        caller="shared",
        outcome="rejected",
        status="RESOURCE_EXHAUSTED",
    )
    minute = at.replace(second=0)
    await anomaly_store.add_refusal_counts(pool, {(minute, acme, "noisy", "INVALID_REQUEST"): 100})
    # A blocked user retrying: refused for the block, which is not the caller's burst.
    add_calls(
        db,
        acme,
        "u-2",
        at=at,
        calls=400,
        tokens=0,
        caller="blocked-users",
        outcome="rejected",
        status="PERMISSION_DENIED",
    )
    # Refusals older than five minutes are not a burst now.
    add_calls(
        db,
        acme,
        "u-3",
        at=now - timedelta(minutes=20),
        calls=400,
        tokens=0,
        caller="earlier",
        outcome="rejected",
        status="RESOURCE_EXHAUSTED",
    )
    found = await detector(pool, Clock(now)).run_once()
    assert sorted(mine(found, acme)) == [
        (f"caller {acme}/noisy", Rule.REFUSAL_BURST, Step.FLAG),
        (f"user {acme}/u-hammer", Rule.REFUSAL_BURST, Step.FLAG),
    ]


async def test_a_caller_fanning_out_to_many_new_users_is_found(
    pool: AsyncConnectionPool, db: psycopg.Connection[Any]
) -> None:
    acme, now = tenant(), now_()
    for i in range(120):
        add_calls(db, acme, f"new-{i}", at=now - timedelta(minutes=10), caller="signup")
        # The same number of users through another caller, all of them known for days.
        add_days(db, acme, f"old-{i}", [10], (now - timedelta(hours=1)).date())  # the day before the hour
        add_calls(db, acme, f"old-{i}", at=now - timedelta(minutes=10), caller="app")
    found = await detector(pool, Clock(now)).run_once()
    assert mine(found, acme) == [(f"caller {acme}/signup", Rule.USER_FANOUT, Step.FLAG)]


async def test_with_escalate_block_a_subject_is_tightened_then_blocked_then_left_alone(
    pool: AsyncConnectionPool, db: psycopg.Connection[Any]
) -> None:
    acme, now = tenant(), now_()
    await anomaly_store.set_policy(
        pool, anomaly_store.TenantPolicy(acme, Step.BLOCK, timedelta(hours=6), timedelta(hours=2), "ops")
    )
    add_days(db, acme, "u-spike", [DAY] * 7, now.date())
    add_calls(db, acme, "u-spike", at=now - timedelta(minutes=20), calls=50, tokens=10_000)

    first = await detector(pool, Clock(now), cooldown_s=0).run_once()
    assert mine(first, acme) == [(f"user {acme}/u-spike", Rule.USAGE_SPIKE, Step.TIGHTEN)]
    limits = db.execute(
        "SELECT kind, amount, expires_at, source FROM limits WHERE tenant = %s AND scope = 'user'"
        " AND subject = 'u-spike' ORDER BY kind",
        (acme,),
    ).fetchall()
    assert [(k, a, s) for k, a, _, s in limits] == [
        ("spend_per_day", 10**12, "detector"),  # half of no spend is the floor: only tokens are tight
        ("tokens_per_day", DAY // 2, "detector"),
    ]
    assert {e for _, _, e, _ in limits} == {now + timedelta(hours=6)}

    later = now + timedelta(minutes=1)
    second = await detector(pool, Clock(later), cooldown_s=0).run_once()
    assert mine(second, acme) == [(f"user {acme}/u-spike", Rule.USAGE_SPIKE, Step.BLOCK)]
    block = db.execute(
        "SELECT source, blocked_by, expires_at, reason FROM blocks WHERE tenant = %s AND scope = 'user'"
        " AND subject = 'u-spike'",
        (acme,),
    ).fetchone()
    assert block is not None
    assert block[:3] == ("detector", "detector", later + timedelta(hours=2))
    assert "usage_spike" in block[3]
    audit = db.execute(
        "SELECT action, source, actor, expires_at FROM block_audit WHERE tenant = %s", (acme,)
    ).fetchall()
    assert audit == [("block", "detector", "detector", later + timedelta(hours=2))]
    actions = db.execute(
        "SELECT action, acted_until FROM anomalies WHERE tenant = %s ORDER BY id", (acme,)
    ).fetchall()
    assert actions == [("tighten", now + timedelta(hours=6)), ("block", later + timedelta(hours=2))]

    # Blocked: the detector leaves it alone while the block lasts.
    third = await detector(pool, Clock(later + timedelta(minutes=1)), cooldown_s=0).run_once()
    assert mine(third, acme) == []


async def test_of_several_processes_one_run_per_interval_acts(pool: AsyncConnectionPool, url: str) -> None:
    clock = Clock(now_() + timedelta(days=2))  # after every other test's runs
    async with AsyncConnectionPool(url, min_size=1, max_size=2, open=False) as other:
        await other.open(wait=True, timeout=10)
        a, b = detector(pool, clock, interval_s=60), detector(other, clock, interval_s=60)
        results = await asyncio.gather(a.run_once(), b.run_once())
        assert sorted(r is None for r in results) == [False, True]
        clock.now += timedelta(seconds=30)  # within the interval: neither runs
        assert await a.run_once() is None and await b.run_once() is None
        clock.now += timedelta(seconds=31)
        assert await b.run_once() is not None


def test_the_policy_command_sets_and_shows_a_tenants_policy(url: str) -> None:
    acme = tenant()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "chatgate_server", "anomalies", "policy", *args],
            env={**os.environ, "DATABASE_URL": url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    shown = cli(acme)
    line = next(line for line in shown.stdout.splitlines() if line.startswith(acme))
    assert line.split() == [acme, "flag", "1d", "1h", "-"]  # no row: flag only
    assert cli(acme, "--escalate", "tighten", "--tighten-for", "90m", "--by", "ops").returncode == 0
    assert cli(acme, "--escalate", "block").returncode == 0  # keeps the spans set before
    shown = cli(acme)
    line = next(line for line in shown.stdout.splitlines() if line.startswith(acme))
    assert line.split()[:4] == [acme, "block", "90m", "1h"]
    refused = cli("--escalate", "block")
    assert refused.returncode == 2 and "--escalate needs a tenant" in refused.stderr
