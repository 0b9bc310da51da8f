"""A Postgres that accepts connections and never answers: rows leave memory within about
the batch linger, so kill -9 loses none, and ledger health says the writes are stuck.

Before, rows waited in memory for the whole write timeout (5 s by default, here a
minute) while health said SERVING; a kill -9 meanwhile lost them all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from chatgate_server.usage.ledger import LedgerState
from chatgate_server.usage.spool import decode_lines
from tests.integration.pgproxy import PgProxy, running_proxy
from tests.integration.test_ledger import (
    expected_rollup,
    files,
    make_record,
    rows_and_rollup,
    running_ledger,
    stored,
)
from tests.integration.test_ledger_bad_records import POISON, dead_letters, refusing_db

__all__ = ["refusing_db"]  # a fixture, used by name

# Linger (50 ms) + spool_after (200 ms) + fsync, with room for a loaded machine; far
# below the write timeouts used here, so only early spooling passes.
SPOOLED_WITHIN_S = 10.0


def spooled_ids(spool_dir: Path) -> list[str]:
    segments = files(spool_dir, "slot-*/segment-*")
    return [r.request_id for p in segments for r in decode_lines(p.read_bytes(), "s")]


async def wait_for(condition: object, timeout_s: float) -> float:
    """Poll ``condition()`` until true; the seconds it took. Fails after ``timeout_s``."""
    assert callable(condition)
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_a_stuck_write_is_spooled_within_the_linger_and_health_says_so(
    migrated_database_url: str, tmp_path: Path
) -> None:
    tenant = f"stuck-{uuid.uuid4().hex[:10]}"
    warm = [make_record(tenant, n) for n in range(3)]
    rows = [make_record(tenant, n) for n in range(3, 203)]
    async with (
        running_proxy(migrated_database_url) as proxy,
        running_ledger(proxy.url_for(migrated_database_url), tmp_path, write_timeout_s=60.0) as ledger,
    ):
        for r in warm:
            ledger.submit(r)
        await stored(ledger)
        proxy.hang()
        for r in rows[:100]:
            ledger.submit(r)
        took = await wait_for(lambda: len(spooled_ids(tmp_path)) == 100, SPOOLED_WITHIN_S)
        print(f"100 rows on disk {took:.3f}s after submit")
        assert ledger.state is LedgerState.SPOOLING  # chatgate.ledger: NOT_SERVING
        for r in rows[100:]:  # rows arriving while the write hangs go to disk too
            ledger.submit(r)
        await wait_for(lambda: len(spooled_ids(tmp_path)) == 200, SPOOLED_WITHIN_S)

        proxy.restore()  # the stuck insert lands now, and the spool replays the same rows
        await stored(ledger)
        assert ledger.stats().state is LedgerState.OK
    stored_rows, rollup = rows_and_rollup(migrated_database_url, tenant)
    assert stored_rows == {r.request_id: 1 for r in warm + rows}
    assert rollup == expected_rollup(warm + rows)


async def test_kill_9_while_postgres_hangs_loses_no_row(migrated_database_url: str, tmp_path: Path) -> None:
    tenant = f"kill9-{uuid.uuid4().hex[:10]}"
    async with running_proxy(migrated_database_url) as proxy:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.ledger_child",
            proxy.url_for(migrated_database_url),
            str(tmp_path),
            tenant,
            "300",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            async with asyncio.timeout(60):
                assert await child.stdout.readline() == b"ready\n"
                _hang_then_go(proxy, child.stdin)
                assert await child.stdout.readline() == b"submitted\n"
            took = await wait_for(lambda: len(spooled_ids(tmp_path)) == 300, SPOOLED_WITHIN_S)
            print(f"300 rows on disk {took:.3f}s after submit")
        finally:
            child.send_signal(signal.SIGKILL)
            await child.wait()
        spooled = spooled_ids(tmp_path)
        proxy.restore()  # Postgres is back (the dead process's insert may land too)

    async with running_ledger(migrated_database_url, tmp_path) as ledger:  # the restart
        await stored(ledger)
    stored_rows, (requests, _, _) = rows_and_rollup(migrated_database_url, tenant)
    assert len(stored_rows) == 303 and set(spooled) <= set(stored_rows)
    assert set(stored_rows.values()) == {1} and requests == 303  # each row once


def _hang_then_go(proxy: PgProxy, stdin: asyncio.StreamWriter) -> None:
    proxy.hang()
    stdin.write(b"go\n")


async def test_a_bad_row_in_a_stuck_write_is_dead_lettered_once(refusing_db: str, tmp_path: Path) -> None:
    # The stuck write lands late and splits its batch around the bad row; the replay of
    # the spooled copy splits it again. One dead letter, every good row once.
    good = [make_record("poison", n) for n in range(20)]
    poison = make_record("poison", 99, requested_model=POISON + "late")
    async with (
        running_proxy(refusing_db) as proxy,
        running_ledger(proxy.url_for(refusing_db), tmp_path, write_timeout_s=60.0) as ledger,
    ):
        ledger.submit(good[0])
        await stored(ledger)
        proxy.hang()
        for r in [*good[1:10], poison, *good[10:]]:
            ledger.submit(r)
        await wait_for(lambda: len(spooled_ids(tmp_path)) == 20, SPOOLED_WITHIN_S)
        proxy.restore()
        await stored(ledger)
        assert ledger.stats().dead_lettered == 1
    stored_rows, _ = rows_and_rollup(refusing_db, "poison")
    assert stored_rows == {r.request_id: 1 for r in good}
    assert [r.request_id for r in dead_letters(tmp_path)] == [poison.request_id]
