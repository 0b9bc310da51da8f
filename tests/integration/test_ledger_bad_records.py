"""One bad record never stops billing: the ledger against real Postgres refusing a row.

The incident: a 3,000-character model name made its row exceed the B-tree limit of
``usage_daily``'s key (SQLSTATE 54000, a psycopg ``OperationalError``). The ledger took
it for Postgres being away, spooled it and retried it forever; every later row queued
behind it, ledger health stayed NOT_SERVING, and a restart replayed the poison.

Values are now cut before they reach Postgres, so that row is stored. A row Postgres
still refuses (a trigger here raises 54000 exactly as the index did) goes alone to the
dead-letter file, live or from a spool, and `chatgate usage-dead-letters` retries it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from grpc_health.v1 import health, health_pb2

from chatgate_server.domain import UsageRecord
from chatgate_server.rpc.ledger_health import LEDGER_HEALTH_SERVICE, LedgerHealth
from chatgate_server.usage import fields
from chatgate_server.usage.ledger import LedgerState
from chatgate_server.usage.spool import DEAD_LETTER_FILE, Spool, decode_lines
from tests.databases import throwaway_database
from tests.integration.test_ledger import files, make_record, rows_and_rollup, running_ledger, stored

POISON = "poison-"

_REFUSE_POISON = f"""
CREATE FUNCTION test_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.requested_model LIKE '{POISON}%' THEN
        RAISE EXCEPTION 'index row size 3016 exceeds btree version 4 maximum 2704 for index %',
            '"usage_daily_pkey"' USING ERRCODE = '54000';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_refuse_poison BEFORE INSERT ON usage_records
    FOR EACH ROW EXECUTE FUNCTION test_refuse_poison();
"""


@pytest.fixture
def refusing_db() -> Iterator[str]:
    """A migrated database of its own whose usage_records refuses models named poison-*."""
    with throwaway_database(os.environ["DATABASE_URL"], "chatgate_poison", migrate=True) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(_REFUSE_POISON.encode())
        yield url


def dead_letters(spool_dir: Path) -> list[UsageRecord]:
    paths = files(spool_dir, f"slot-*/{DEAD_LETTER_FILE}")
    return [r for path in paths for r in decode_lines(path.read_bytes(), "dl")]


async def test_a_3000_character_model_is_stored_cut_and_billing_goes_on(
    migrated_database_url: str, tmp_path: Path
) -> None:
    tenant = f"ledger-{uuid.uuid4().hex[:10]}"
    head = secrets.token_hex(1500)  # 3,000 characters that do not compress
    long_a = make_record(tenant, 1, requested_model=head + "a", user_id=secrets.token_hex(1500))
    long_b = make_record(tenant, 2, requested_model=head + "b", tags={"k" * 500: "v" * 5000})
    good = [make_record(tenant, n) for n in range(20)]
    async with running_ledger(migrated_database_url, tmp_path) as ledger:
        for r in [*good[:10], long_a, long_b, *good[10:]]:
            ledger.submit(r)
        await stored(ledger)
        assert ledger.state is LedgerState.OK  # chatgate.ledger health: SERVING
        assert ledger.stats().dead_lettered == 0
    rows, (requests, _, _) = rows_and_rollup(migrated_database_url, tenant)
    assert rows == {r.request_id: 1 for r in [*good, long_a, long_b]}
    assert requests == 22
    with psycopg.connect(migrated_database_url) as conn:
        models = conn.execute(
            "SELECT model FROM usage_daily WHERE tenant = %s AND model LIKE %s", [tenant, head[:100] + "%"]
        ).fetchall()
    # Cut to the documented size, and still two models: the cut keeps a hash of the whole.
    assert len(models) == 2
    assert all(len(m.encode()) <= fields.MODEL_BYTES for (m,) in models)


async def test_a_row_postgres_refuses_for_a_program_limit_is_dead_lettered_alone(
    refusing_db: str, tmp_path: Path
) -> None:
    tenant = "poison"
    good = [make_record(tenant, n) for n in range(40)]
    poison = make_record(tenant, 99, requested_model=POISON + "x")
    async with running_ledger(refusing_db, tmp_path) as ledger:
        health_servicer = health.aio.HealthServicer()
        ledger_health = LedgerHealth(health_servicer, ("",))
        ledger.add_listener(ledger_health)
        for r in [*good[:17], poison, *good[17:]]:
            ledger.submit(r)
        await stored(ledger)
        stats = ledger.stats()
        assert stats.state is LedgerState.OK  # not held NOT_SERVING by a bad row
        ledger_health(ledger.state)
        await ledger_health.settled()
        check = await health_servicer.Check(
            health_pb2.HealthCheckRequest(service=LEDGER_HEALTH_SERVICE),
            None,  # a known service: the context is not used
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert stats.dead_lettered == 1 and stats.spooled_records == 0
        more = [make_record(tenant, n) for n in range(40, 50)]
        for r in more:  # and rows after it are written straight away
            ledger.submit(r)
        await stored(ledger)
    rows, _ = rows_and_rollup(refusing_db, tenant)
    assert rows == {r.request_id: 1 for r in good + more}
    assert [r.request_id for r in dead_letters(tmp_path)] == [poison.request_id]
    assert not files(tmp_path, "slot-*/segment-*")


async def test_a_poisoned_spool_left_by_an_earlier_process_drains(refusing_db: str, tmp_path: Path) -> None:
    tenant = "poison"
    good = [make_record(tenant, n) for n in range(30)]
    poison = make_record(tenant, 99, requested_model=POISON + "y")
    earlier = Spool(tmp_path, max_bytes=10**8)
    earlier.open()
    earlier.append([*good[:10], poison, *good[10:]])
    earlier.close()

    async with running_ledger(refusing_db, tmp_path) as ledger:
        await stored(ledger)
        assert ledger.state is LedgerState.OK
        assert ledger.stats().dead_lettered == 1
    rows, _ = rows_and_rollup(refusing_db, tenant)
    assert rows == {r.request_id: 1 for r in good}
    assert [r.request_id for r in dead_letters(tmp_path)] == [poison.request_id]
    assert not files(tmp_path, "slot-*/segment-*")

    # A restart does not replay the dead letter as if it were pending.
    async with running_ledger(refusing_db, tmp_path) as ledger:
        await stored(ledger)
        assert ledger.stats().dead_lettered == 0


def dead_letters_command(action: str, url: str, spool_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHATGATE_"))}
    return subprocess.run(
        [sys.executable, "-m", "chatgate_server", "usage-dead-letters", action],
        env={**env, "DATABASE_URL": url, "CHATGATE_SPOOL_DIR": str(spool_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_dead_letters_are_listed_and_replayed_once_the_schema_is_fixed(
    refusing_db: str, tmp_path: Path
) -> None:
    tenant = "poison"
    poisons = [make_record(tenant, n, requested_model=f"{POISON}{n}") for n in range(3)]
    good = make_record(tenant, 7)
    async with running_ledger(refusing_db, tmp_path) as ledger:
        for r in [poisons[0], good, *poisons[1:]]:
            ledger.submit(r)
        await stored(ledger)

    listed = dead_letters_command("list", refusing_db, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "3 dead letter(s)" in listed.stdout
    assert all(p.request_id in listed.stdout for p in poisons)
    assert "54000" in listed.stdout or "exceeds btree" in listed.stdout  # the reason is kept

    still = dead_letters_command("replay", refusing_db, tmp_path)
    assert still.returncode == 1
    assert "0 stored, 0 already stored, 3 still refused" in still.stdout
    assert len(dead_letters(tmp_path)) == 3  # kept, once each

    with psycopg.connect(refusing_db, autocommit=True) as conn:  # the operator fixes the schema
        conn.execute("DROP TRIGGER test_refuse_poison ON usage_records")
    fixed = dead_letters_command("replay", refusing_db, tmp_path)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "3 stored, 0 already stored, 0 still refused" in fixed.stdout
    rows, (requests, _, _) = rows_and_rollup(refusing_db, tenant)
    assert rows == {r.request_id: 1 for r in [good, *poisons]}
    assert requests == 4
    assert "0 dead letter(s)" in dead_letters_command("list", refusing_db, tmp_path).stdout
    again = dead_letters_command("replay", refusing_db, tmp_path)
    assert "0 stored, 0 already stored, 0 still refused" in again.stdout
