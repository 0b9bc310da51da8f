"""The operator commands against a Postgres that connects and then does not answer: a
transaction holds the tables they read (as a stuck session or a long migration would).
Each gives up at CHATGATE_COMMAND_TIMEOUT_SECONDS with one line and a non-zero exit,
instead of holding the operator's shell (or a script) forever."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.databases import throwaway_database

COMMANDS = [
    ("limits", "show"),
    ("limits", "set", "tenant", "acme", "--requests-per-minute", "5"),
    ("blocks", "list"),
    ("block", "user", "acme/u-1", "--reason", "x"),
    ("anomalies", "policy"),
    ("callers", "list"),
    ("usage", "--since", "1h", "--by", "user"),
]
HELD = (
    "limits, blocks, block_audit, anomaly_policies, callers, caller_credentials, usage_records, usage_daily"
)
BOUND_S = 3


@pytest.fixture
def database(database_url: str) -> Iterator[str]:
    with throwaway_database(database_url, "chatgate_locked", migrate=True) as url:
        yield url


async def run(url: str, *args: str, **env: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatgate_server", *args,
        env={**os.environ, "DATABASE_URL": url, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, "hung", time.monotonic() - t0
    return proc.returncode or 0, err.decode(), time.monotonic() - t0


async def test_commands_give_up_when_postgres_answers_nothing_after_connecting(database: str) -> None:
    with psycopg.connect(database) as holder:
        holder.execute(f"LOCK TABLE {HELD} IN ACCESS EXCLUSIVE MODE")
        results = await asyncio.gather(
            *(run(database, *args, CHATGATE_COMMAND_TIMEOUT_SECONDS=str(BOUND_S)) for args in COMMANDS)
        )
        holder.rollback()
    for args, (code, err, took) in zip(COMMANDS, results, strict=True):
        assert code == 1, (args, code, err)
        assert err.splitlines() == [err.strip()] and f"gave up after {BOUND_S}s" in err, (args, err)
        assert BOUND_S <= took < BOUND_S + 20, (args, took)
    with psycopg.connect(database) as conn:  # the refused change left nothing behind
        assert conn.execute("SELECT count(*) FROM limits").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM blocks").fetchone() == (0,)


async def test_the_bound_is_checked_and_zero_lifts_it(database: str) -> None:
    code, err, _ = await run(database, "limits", "show", CHATGATE_COMMAND_TIMEOUT_SECONDS="soon")
    assert code == 2 and err.strip() == (
        "chatgate: configuration error: CHATGATE_COMMAND_TIMEOUT_SECONDS must be a number, got 'soon'"
    )
    code, err, _ = await run(database, "limits", "show", CHATGATE_COMMAND_TIMEOUT_SECONDS="0")
    assert code == 0, err
