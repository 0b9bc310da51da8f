"""The operator commands, run as a user would: ``chatgate usage``, ``usage-retention``, ``usage-reprice``."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from chatgate_server.domain import Cost, Outcome, TokenUsage, UsageRecord
from chatgate_server.usage.commands import parse_when, usd
from chatgate_server.usage.maintenance import month_start
from chatgate_server.usage.pricing import PRICE_VERSION, cost_of
from chatgate_server.usage.store import UsageStore
from tests.databases import throwaway_database


def chatgate(*args: str, url: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHATGATE_"))}
    return subprocess.run(
        [sys.executable, "-m", "chatgate_server", *args],
        env={**env, "DATABASE_URL": url, **extra_env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def record(tenant: str, user: str, started_at: datetime, tokens: int = 1000, **overrides: Any) -> UsageRecord:
    model = overrides.pop("model", "gpt-4o")
    usage = TokenUsage(input_tokens=tokens - tokens // 4, output_tokens=tokens // 4)
    fields: dict[str, Any] = {
        "request_id": f"cmd-{uuid.uuid4().hex}",
        "tenant": tenant,
        "caller_service": "svc",
        "user_id": user,
        "requested_model": model,
        "resolved_model": None,
        "upstream_response_id": None,
        "usage": usage,
        "cost": cost_of(model, usage),
        "outcome": Outcome.COMPLETED,
        "grpc_status": "OK",
        "finish_reason": "stop",
        "attempts": 1,
        "time_to_first_token_ms": None,
        "duration_ms": 1.0,
        "started_at": started_at,
        **overrides,
    }
    return UsageRecord(**fields)


def insert(url: str, records: list[UsageRecord]) -> None:
    async def run() -> None:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(url, min_size=1, max_size=1, open=False)
        await pool.open(wait=True)
        try:
            await UsageStore(pool).insert(records)
        finally:
            await pool.close()

    asyncio.run(run())


@pytest.fixture
def tenant() -> str:
    return f"cmd-{uuid.uuid4().hex[:8]}"


def test_durations_dates_and_dollars() -> None:
    now = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
    assert parse_when("7d", now) == now - timedelta(days=7)
    assert parse_when("90m", now) == now - timedelta(minutes=90)
    assert parse_when("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_when("2026-11-01T05:00:00+02:00", now) == datetime(2026, 11, 1, 3, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither a duration"):
        parse_when("last tuesday", now)
    assert usd(0) == "0.000000"
    assert usd(1_234_567) == "1.234567"
    assert usd(-5) == "-0.000005"


def test_usage_report_as_csv_and_table(migrated_database_url: str, tenant: str) -> None:
    day = datetime.combine(datetime.now(UTC).date() - timedelta(days=3), time(), tzinfo=UTC)
    records = [
        record(tenant, user, day + timedelta(hours=h), tokens=100 * (h + 1), model=model)
        for h, (user, model) in enumerate(
            [("alice", "gpt-4o"), ("bob", "gpt-4o"), ("alice", "gpt-4o-mini"), ("bob", "no-such-model")] * 3
        )
    ]
    insert(migrated_database_url, records)
    window = [
        "--since",
        day.isoformat(),
        "--until",
        (day + timedelta(days=1)).isoformat(),
        "--tenant",
        tenant,
    ]

    ran = chatgate("usage", *window, "--by", "user,model", "--format", "csv", url=migrated_database_url)
    assert ran.returncode == 0, ran.stderr
    rows = list(csv.DictReader(io.StringIO(ran.stdout)))
    want: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in records:
        acc = want[(r.user_id, r.requested_model)]
        acc[0] += 1
        acc[1] += r.usage.total_tokens
        acc[2] += r.cost.usd_micros or 0
        acc[3] += r.cost.usd_micros is None
    got = {
        (row["user"], row["model"]): [
            int(row["requests"]),
            int(row["total_tokens"]),
            int(row["cost_usd"].replace(".", "")),
            int(row["unpriced_requests"]),
        ]
        for row in rows
    }
    assert got == want

    ran = chatgate("usage", *window, "--by", "user", url=migrated_database_url)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0].split() == [
        "user",
        "requests",
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "reasoning_tokens",
        "total_tokens",
        "cost_usd",
        "unpriced_requests",
    ]
    assert [line.split()[0] for line in lines[2:4]] == ["alice", "bob"]
    total = lines[-1].split()
    assert total[0] == "TOTAL"
    assert int(total[1]) == len(records)
    assert int(total[6]) == sum(r.usage.total_tokens for r in records)


def test_usage_report_refuses_bad_arguments_in_one_line(migrated_database_url: str) -> None:
    ran = chatgate("usage", "--by", "planet", url=migrated_database_url)
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines() == [
        "chatgate: usage: --by 'planet': use tenant, user, model, day, deployment, fallback, service_tier"
        " or tag:<key>"
    ]


def test_top_users_versus_their_usual(migrated_database_url: str, tenant: str) -> None:
    now = datetime.now(UTC)
    today = datetime.combine(now.date(), time(), tzinfo=UTC)
    baseline = []
    for d in range(1, 8):  # the seven whole days before today
        noon = today - timedelta(days=d) + timedelta(hours=12)
        baseline += [record(tenant, "steady", noon, tokens=2400), record(tenant, "spiky", noon, tokens=240)]
    # Within the last hour but never before midnight: the baseline is the whole days
    # before today, so a "recent" row from 23:5x yesterday would land in it.
    recent = max(now - timedelta(minutes=10), today)
    last_hour = [
        record(tenant, "steady", recent, tokens=100),
        record(tenant, "spiky", recent, tokens=50_000),
        record(tenant, "newcomer", recent, tokens=3_000),
    ]
    insert(migrated_database_url, baseline + last_hour)

    ran = chatgate(
        "usage", "--vs-usual", "--since", "1h", "--baseline", "7d", "--tenant", tenant, "--format", "csv",
        url=migrated_database_url,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    rows = list(csv.DictReader(io.StringIO(ran.stdout)))
    assert [r["user"] for r in rows] == ["spiky", "newcomer", "steady"]
    spiky, newcomer, steady = rows
    assert spiky["total_tokens"] == "50000"
    assert spiky["usual_tokens"] == "10"  # 240 a day is 10 an hour
    assert float(spiky["x_usual"]) == pytest.approx(5000.0)
    assert newcomer["x_usual"] == "new"
    assert float(steady["x_usual"]) == pytest.approx(1.0)


def test_reprice_recomputes_a_window_and_keeps_the_roll_up_in_step(
    migrated_database_url: str, tenant: str
) -> None:
    when = datetime(2020, 2, 3, 4, 5, tzinfo=UTC)
    stale = [
        record(tenant, "u", when + timedelta(seconds=i), tokens=10_000, cost=Cost(1, "1999-01-01"))
        for i in range(5)
    ]
    unknown = record(
        tenant, "u", when + timedelta(seconds=9), model="no-such-model", cost=Cost(77, "1999-01-01")
    )
    outside = record(tenant, "u", when + timedelta(hours=2), cost=Cost(1, "1999-01-01"))
    insert(migrated_database_url, [*stale, unknown, outside])
    window = ["--since", when.isoformat(), "--until", (when + timedelta(minutes=1)).isoformat()]

    dry = chatgate("usage-reprice", *window, "--dry-run", url=migrated_database_url)
    assert dry.returncode == 0, dry.stderr
    assert "would change 6" in dry.stdout

    ran = chatgate("usage-reprice", *window, url=migrated_database_url)
    assert ran.returncode == 0, ran.stderr
    assert "changed 6" in ran.stdout and PRICE_VERSION in ran.stdout
    with psycopg.connect(migrated_database_url) as conn:
        got: dict[str, tuple[Any, ...]] = {
            str(r[0]): (r[1], r[2])
            for r in conn.execute(
                "SELECT request_id, cost_usd_micros, price_version FROM usage_records WHERE tenant = %s",
                [tenant],
            ).fetchall()
        }
        daily = conn.execute(
            "SELECT sum(cost_usd_micros), sum(unpriced_requests) FROM usage_daily WHERE tenant = %s", [tenant]
        ).fetchone()
        rows = conn.execute(
            "SELECT sum(cost_usd_micros), count(*) FILTER (WHERE cost_usd_micros IS NULL)"
            " FROM usage_records WHERE tenant = %s",
            [tenant],
        ).fetchone()
    right = cost_of("gpt-4o", stale[0].usage).usd_micros
    assert all(got[r.request_id] == (right, PRICE_VERSION) for r in stale)
    assert got[unknown.request_id] == (None, "none")  # no price: unknown, never a guess
    assert got[outside.request_id] == (1, "1999-01-01")  # outside the window: untouched
    assert daily == rows  # the roll-up moved with the rows

    again = chatgate("usage-reprice", *window, url=migrated_database_url)
    assert "changed 0" in again.stdout


def test_reprice_works_from_the_operators_price_file_and_zeroes_refused_calls(
    migrated_database_url: str, tenant: str, tmp_path: Path
) -> None:
    when = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    # Rows written by an older chatgate: no cost_basis, refused calls charged their estimate.
    served = record(
        tenant, "u", when, tokens=4000, model="gpt-4o-mini", resolved_model="gpt-4o-mini-2024-07-18"
    )
    old_version = record(tenant, "u", when - timedelta(days=200), tokens=4000, model="gpt-4o-mini")
    refused = record(
        tenant, "u", when + timedelta(seconds=1), tokens=4000, model="gpt-4o-mini::status=500",
        outcome=Outcome.UPSTREAM_ERROR, grpc_status="UNAVAILABLE", cost=Cost(450, "2026-11-01"),
        usage=TokenUsage(input_tokens=3000, source="estimated"),
    )  # fmt: skip
    insert(migrated_database_url, [served, old_version, refused])
    prices = tmp_path / "prices.csv"
    prices.write_text(
        "model,input,cached_input,output,valid_from\n"
        "gpt-4o-mini,1.00,,2.00,2025-01-01\n"
        "gpt-4o-mini,3.00,,4.00,2026-05-01\n"  # a new version: no code change
    )
    window = [
        "--since",
        (when - timedelta(days=365)).isoformat(),
        "--until",
        (when + timedelta(hours=1)).isoformat(),
    ]
    ran = chatgate("usage-reprice", *window, url=migrated_database_url, CHATGATE_PRICES_FILE=str(prices))
    assert ran.returncode == 0, ran.stderr
    assert "changed 3" in ran.stdout and str(prices) in ran.stdout
    with psycopg.connect(migrated_database_url) as conn:
        got = {
            str(r[0]): tuple(r[1:])
            for r in conn.execute(
                "SELECT request_id, cost_usd_micros, price_version, cost_basis FROM usage_records"
                " WHERE tenant = %s",
                [tenant],
            ).fetchall()
        }
        daily = conn.execute(
            "SELECT sum(cost_usd_micros) FROM usage_daily WHERE tenant = %s", [tenant]
        ).fetchone()
    # 3000 input + 1000 output tokens at the version in force when each call started.
    assert got[served.request_id] == (3000 * 3 + 1000 * 4, "operator:2026-05-01", "priced")
    assert got[old_version.request_id] == (3000 * 1 + 1000 * 2, "operator:2025-01-01", "priced")
    assert got[refused.request_id] == (0, "none", "not_charged")
    assert daily == (13_000 + 5_000,)

    bad = tmp_path / "bad.csv"
    bad.write_text("model,input\n")
    failed = chatgate("usage-reprice", *window, url=migrated_database_url, CHATGATE_PRICES_FILE=str(bad))
    assert failed.returncode == 1
    assert "CHATGATE_PRICES_FILE" in failed.stderr and "header" in failed.stderr


@pytest.fixture
def fresh_db() -> Iterator[str]:
    with throwaway_database(os.environ["DATABASE_URL"], "chatgate_ret", migrate=True) as url:
        yield url


def partitions(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'usage_records'::regclass"
        ).fetchall()
    return {str(r[0]) for r in rows}


def test_retention_drops_whole_old_months_and_keeps_the_rest(fresh_db: str) -> None:
    today = datetime.now(UTC).date()

    def month(back: int) -> date:
        return month_start(today, back)

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        for back in (5, 3, 2):
            conn.execute("SELECT chatgate_create_usage_partition(%s)", [month(back)])

    def at(d: date) -> datetime:
        return datetime.combine(d, time(12), tzinfo=UTC)

    old = [record("t", "u", at(month(5))), record("t", "u", at(month(3)) + timedelta(days=3))]
    stray = record("t", "u", datetime(2001, 1, 1, tzinfo=UTC))  # in the default partition
    kept = [record("t", "u", at(month(2))), record("t", "u", at(month(1))), record("t", "u", at(today))]
    insert(fresh_db, [*old, stray, *kept])
    name = {back: f"usage_records_{month(back):%Y%m}" for back in range(6)}
    assert {name[5], name[3], name[2], name[1], name[0]} <= partitions(fresh_db)

    dry = chatgate("usage-retention", "--months", "2", "--dry-run", url=fresh_db)
    assert dry.returncode == 0, dry.stderr
    assert f"would drop partitions: {name[5]}, {name[3]}" in dry.stdout
    assert {name[5], name[3]} <= partitions(fresh_db)

    ran = chatgate("usage-retention", "--months", "2", url=fresh_db)
    assert ran.returncode == 0, ran.stderr
    assert f"keeping usage since {month(2).isoformat()}" in ran.stdout
    left = partitions(fresh_db)
    assert name[5] not in left and name[3] not in left
    assert {name[2], name[1], name[0], "usage_records_default"} <= left
    with psycopg.connect(fresh_db) as conn:
        ids = {r[0] for r in conn.execute("SELECT request_id FROM usage_records").fetchall()}
        daily = conn.execute("SELECT sum(requests), min(day) FROM usage_daily").fetchone()
    assert ids == {r.request_id for r in kept}
    assert daily == (len(kept), month(2))

    # The period comes from the environment when not given.
    env_run = subprocess.run(
        [sys.executable, "-m", "chatgate_server", "usage-retention", "--dry-run"],
        env={**os.environ, "DATABASE_URL": fresh_db, "CHATGATE_USAGE_RETENTION_MONTHS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert env_run.returncode == 0, env_run.stderr
    assert f"would drop partitions: {name[2]}" in env_run.stdout


def test_usage_by_tag_labels_the_rows_without_it(migrated_database_url: str, tenant: str) -> None:
    day = datetime.combine(datetime.now(UTC).date() - timedelta(days=2), time(), tzinfo=UTC)
    insert(
        migrated_database_url,
        [
            record(tenant, "alice", day, tags={"feature": "search"}),
            record(tenant, "alice", day + timedelta(hours=1)),
            record(tenant, "bob", day + timedelta(hours=2), tags={"team": "docs"}),
        ],
    )
    window = [
        "--since",
        day.isoformat(),
        "--until",
        (day + timedelta(days=1)).isoformat(),
        "--tenant",
        tenant,
    ]

    ran = chatgate("usage", *window, "--by", "tag:feature", url=migrated_database_url)
    assert ran.returncode == 0, ran.stderr
    labels = {line.split()[0]: int(line.split()[1]) for line in ran.stdout.splitlines()[2:-2]}
    assert labels == {"(untagged)": 2, "search": 1}

    ran = chatgate("usage", *window, "--by", "tag:feature", "--format", "csv", url=migrated_database_url)
    assert {row["tag"] for row in csv.DictReader(io.StringIO(ran.stdout))} == {"", "search"}


def test_usage_by_service_tier_splits_what_each_tier_served(migrated_database_url: str, tenant: str) -> None:
    # Whole days ago: a report reads those from the daily rollup, which keeps no tier;
    # grouping by tier must read the rows.
    now = datetime.combine(datetime.now(UTC).date() - timedelta(days=2), time(12), tzinfo=UTC)
    records = [
        record(tenant, "alice", now, tokens=1000, service_tier="flex"),
        record(tenant, "alice", now, tokens=2000, service_tier="flex"),
        record(tenant, "bob", now, tokens=4000, service_tier="priority"),
        record(tenant, "bob", now, tokens=8000),  # the upstream named no tier
    ]
    insert(migrated_database_url, records)
    since = (now - timedelta(days=3)).isoformat()
    ran = chatgate(
        "usage", "--since", since, "--tenant", tenant, "--by", "service_tier", "--format", "csv",
        url=migrated_database_url,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    got = {
        row["service_tier"]: (int(row["requests"]), int(row["total_tokens"]))
        for row in csv.DictReader(io.StringIO(ran.stdout))
    }
    assert got == {"flex": (2, 3000), "priority": (1, 4000), "": (1, 8000)}


def test_reprice_prices_a_deployments_rows_from_its_own_file(
    migrated_database_url: str, tenant: str, tmp_path: Path
) -> None:
    when = datetime(2019, 3, 4, 5, 6, tzinfo=UTC)
    stale = Cost(1, "1999-01-01")
    rows = [
        record(tenant, "u", when, model="gpt-4o-mini", cost=stale, deployment="self-hosted"),
        record(
            tenant, "u", when + timedelta(seconds=1), model="gpt-4o-mini", cost=stale, deployment="openai"
        ),
    ]
    insert(migrated_database_url, rows)
    free = tmp_path / "free.csv"
    free.write_text("model,input,cached_input,output,valid_from\ngpt-4o-mini,0,,0,2010-01-01\n")
    config = tmp_path / "chatgate.toml"
    config.write_text(
        '[[deployments]]\nname = "openai"\nkind = "openai"\nkey_env = "NOT_NEEDED_HERE"\n'
        '[[deployments]]\nname = "self-hosted"\nkind = "compatible"\nbase_url = "http://127.0.0.1:9/v1"\n'
        f'prices_file = "{free}"\n'
    )
    window = ["--since", when.isoformat(), "--until", (when + timedelta(minutes=1)).isoformat()]
    ran = chatgate("usage-reprice", *window, url=migrated_database_url, CHATGATE_CONFIG=str(config))
    assert ran.returncode == 0, ran.stderr
    assert "changed 2" in ran.stdout and "deployments self-hosted" in ran.stdout
    with psycopg.connect(migrated_database_url) as conn:
        got: dict[object, object] = dict(
            conn.execute(
                "SELECT deployment, cost_usd_micros FROM usage_records WHERE tenant = %s", [tenant]
            ).fetchall()
        )
    assert got == {"self-hosted": 0, "openai": cost_of("gpt-4o-mini", rows[1].usage).usd_micros}
