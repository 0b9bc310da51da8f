"""The migration runner on real Postgres, each test in a throwaway database of its own."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
import pytest

from chatgate_server.usage import migrate
from chatgate_server.usage.migrate import (
    MIGRATION_LOCK_KEY,
    Migration,
    MigrationError,
    apply_migrations,
    load_migrations,
    pending_migrations,
)
from tests.databases import throwaway_database

ALL = [m.name for m in load_migrations()]


@pytest.fixture
def fresh_db() -> Iterator[str]:
    """An empty database for one test, dropped afterwards."""
    admin = os.environ.get("DATABASE_URL")
    if not admin:
        pytest.fail("DATABASE_URL is not set")
    with throwaway_database(admin, "chatgate_migr") as url:
        yield url


def _month_names(months_behind: int, months_ahead: int) -> list[str]:
    now = datetime.now(UTC)
    index = now.year * 12 + now.month - 1
    return [
        f"usage_records_{i // 12:04d}{i % 12 + 1:02d}"
        for i in range(index - months_behind, index + months_ahead + 1)
    ]


def _partitions(conn: psycopg.Connection[tuple[object, ...]]) -> set[str]:
    rows = conn.execute(
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'usage_records'::regclass"
    )
    return {str(r[0]) for r in rows}


def test_packaged_migrations_are_numbered_in_order() -> None:
    migrations = load_migrations()
    assert migrations, "no migrations shipped in the package"
    assert migrations[0].name == "0001_usage"
    versions = [m.version for m in migrations]
    assert versions == sorted(set(versions))
    assert all(m.name.startswith(f"{m.version:04d}_") for m in migrations)


def test_fresh_database_migrates(fresh_db: str) -> None:
    assert pending_migrations(fresh_db) == ALL

    assert apply_migrations(fresh_db) == ALL

    assert pending_migrations(fresh_db) == []
    with psycopg.connect(fresh_db) as conn:
        recorded = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
        assert recorded == [(m.version, m.name) for m in load_migrations()]
        tables = {
            str(r[0])
            for r in conn.execute(
                "SELECT relname FROM pg_class"
                " WHERE relname IN ('usage_records', 'usage_daily') AND relkind IN ('p', 'r')"
            )
        }
        assert tables == {"usage_records", "usage_daily"}
        # Last month to three months ahead, plus the safety-net default.
        assert _partitions(conn) == {*_month_names(1, 3), "usage_records_default"}


def test_rerun_is_a_no_op(fresh_db: str) -> None:
    apply_migrations(fresh_db)
    with psycopg.connect(fresh_db) as conn:
        before = conn.execute("SELECT version, name, applied_at FROM schema_migrations ORDER BY 1").fetchall()

    assert apply_migrations(fresh_db) == []
    assert apply_migrations(fresh_db) == []

    with psycopg.connect(fresh_db) as conn:
        after = conn.execute("SELECT version, name, applied_at FROM schema_migrations ORDER BY 1").fetchall()
    assert after == before


def test_concurrent_runners_apply_each_migration_exactly_once(fresh_db: str) -> None:
    runners = 6
    start = threading.Barrier(runners)

    def run() -> list[str]:
        start.wait()
        return apply_migrations(fresh_db)

    with ThreadPoolExecutor(runners) as pool:
        results = [f.result() for f in [pool.submit(run) for _ in range(runners)]]

    # Every runner succeeded; between them each migration was applied once (each
    # migration's transaction holds the lock, so runners may take turns).
    assert sorted(name for result in results for name in result) == sorted(ALL)
    with psycopg.connect(fresh_db) as conn:
        count = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert count == (len(ALL),)


def test_runner_waits_for_the_advisory_lock(fresh_db: str) -> None:
    # Another replica is migrating: this runner must wait for it, not run alongside.
    with psycopg.connect(fresh_db, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK_KEY])
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(apply_migrations, fresh_db)
            time.sleep(0.5)
            assert not future.done()
            assert pending_migrations(fresh_db) == ALL
            holder.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK_KEY])
            assert future.result(timeout=30) == ALL
    # ...and releases it when done.
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT pg_try_advisory_lock(%s)", [MIGRATION_LOCK_KEY]).fetchone() == (True,)


def test_a_failing_migration_rolls_back_alone(fresh_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    good = Migration(1, "0001_good", "CREATE TABLE good_table (x int); INSERT INTO good_table VALUES (1);")
    bad = Migration(2, "0002_bad", "CREATE TABLE bad_table (x int); SELECT 1 / 0;")
    monkeypatch.setattr(migrate, "load_migrations", lambda: [good, bad])

    with pytest.raises(psycopg.errors.DivisionByZero):
        apply_migrations(fresh_db)

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchall() == [(1,)]
        assert conn.execute("SELECT to_regclass('good_table') IS NOT NULL").fetchone() == (True,)
        assert conn.execute("SELECT to_regclass('bad_table') IS NULL").fetchone() == (True,)
        # The lock was released despite the failure.
        assert conn.execute("SELECT pg_try_advisory_lock(%s)", [MIGRATION_LOCK_KEY]).fetchone() == (True,)
    assert pending_migrations(fresh_db) == ["0002_bad"]


def test_a_renamed_applied_migration_is_refused(fresh_db: str) -> None:
    apply_migrations(fresh_db)
    with psycopg.connect(fresh_db) as conn:
        conn.execute("UPDATE schema_migrations SET name = '0001_something_else' WHERE version = 1")
    with pytest.raises(MigrationError, match="0001"):
        apply_migrations(fresh_db)


def test_partition_function_is_idempotent_and_creates_missing_months(fresh_db: str) -> None:
    apply_migrations(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT chatgate_ensure_usage_partitions(3, 1)").fetchone() == (0,)
        two_ahead = _month_names(0, 2)[-1]
        conn.execute(f"DROP TABLE {two_ahead}")
        # Created from a session in another time zone: the edges must still be UTC months.
        conn.execute("SET TIME ZONE 'America/New_York'")
        assert conn.execute("SELECT chatgate_ensure_usage_partitions(5)").fetchone() == (3,)
        assert _partitions(conn) == {*_month_names(1, 5), "usage_records_default"}
        assert conn.execute("SELECT chatgate_ensure_usage_partitions(5)").fetchone() == (0,)

        conn.execute("SET TIME ZONE 'UTC'")
        bound = conn.execute(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = %s", [two_ahead]
        ).fetchone()
        year, month = int(two_ahead[-6:-2]), int(two_ahead[-2:])
        nyear, nmonth = (year + 1, 1) if month == 12 else (year, month + 1)
        assert bound == (
            f"FOR VALUES FROM ('{year:04d}-{month:02d}-01 00:00:00+00') "
            f"TO ('{nyear:04d}-{nmonth:02d}-01 00:00:00+00')",
        )


def test_replicas_ensuring_partitions_at_once_all_succeed(fresh_db: str) -> None:
    apply_migrations(fresh_db)
    runners = 5
    start = threading.Barrier(runners)

    def ensure() -> int:
        with psycopg.connect(fresh_db, autocommit=True) as conn:
            start.wait()
            row = conn.execute("SELECT chatgate_ensure_usage_partitions(8, 1)").fetchone()
            assert row is not None
            return int(row[0])

    with ThreadPoolExecutor(runners) as pool:
        created = [f.result() for f in [pool.submit(ensure) for _ in range(runners)]]

    assert sum(created) == 5  # months +4 .. +8, each made by exactly one replica
    with psycopg.connect(fresh_db) as conn:
        assert _partitions(conn) == {*_month_names(1, 8), "usage_records_default"}
