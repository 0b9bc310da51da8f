"""The operator commands against a Postgres that accepts connections and never answers
(each gives up within its connect bound), and against one that connects and then answers
nothing: a transaction holds the tables they read, as a stuck session or a long
migration would (each gives up at CHATGATE_COMMAND_TIMEOUT_SECONDS). Either way: one
line, a non-zero exit, never a hang that holds the operator's shell or a script."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.databases import throwaway_database
from tests.integration.pgproxy import running_proxy

COMMANDS = [
    ("limits", "show"),
    ("limits", "set", "tenant", "acme", "--requests-per-minute", "5"),
    ("block", "user", "acme/u-1", "--reason", "x"),
    ("blocks", "list"),
    ("anomalies", "policy"),
    ("callers", "list"),
]


async def run(url: str, *args: str, **env: str) -> tuple[int, str, float]:
    """One command in a process of its own: exit code, stderr, seconds taken ("hung"
    and -1 when it was still running after a minute)."""
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


async def test_commands_give_up_on_a_hanging_postgres(migrated_database_url: str) -> None:
    async with running_proxy(migrated_database_url) as proxy:
        proxy.hang()
        url = proxy.url_for(migrated_database_url)
        results = await asyncio.gather(*(run(url, *args, PGCONNECT_TIMEOUT="3") for args in COMMANDS))
    for args, (code, err, took) in zip(COMMANDS, results, strict=True):
        assert code not in (0, -1), (args, code, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert took < 30, (args, took)


# Every command above, and a usage report (it reads the rows and their daily roll-up).
LOCKED_COMMANDS = [*COMMANDS, ("usage", "--since", "1h", "--by", "user")]
HELD = (
    "limits, blocks, block_audit, anomaly_policies, callers, caller_credentials, usage_records, usage_daily"
)
BOUND_S = 3


@pytest.fixture
def database(database_url: str) -> Iterator[str]:
    with throwaway_database(database_url, "chatgate_locked", migrate=True) as url:
        yield url


async def test_commands_give_up_when_postgres_answers_nothing_after_connecting(database: str) -> None:
    with psycopg.connect(database) as holder:
        holder.execute(f"LOCK TABLE {HELD} IN ACCESS EXCLUSIVE MODE")
        results = await asyncio.gather(
            *(run(database, *args, CHATGATE_COMMAND_TIMEOUT_SECONDS=str(BOUND_S)) for args in LOCKED_COMMANDS)
        )
        holder.rollback()
    for args, (code, err, took) in zip(LOCKED_COMMANDS, results, strict=True):
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
