"""The operator commands against a Postgres that accepts connections and never answers:
each gives up with one line and a non-zero exit within its connect bound, never hangs."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from tests.integration.pgproxy import running_proxy

COMMANDS = [
    ("limits", "show"),
    ("limits", "set", "tenant", "acme", "--requests-per-minute", "5"),
    ("block", "user", "acme/u-1", "--reason", "x"),
    ("blocks", "list"),
    ("anomalies", "policy"),
    ("callers", "list"),
]


async def run(url: str, *args: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatgate_server", *args,
        env={**os.environ, "DATABASE_URL": url, "PGCONNECT_TIMEOUT": "3"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 45)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, "hung", time.monotonic() - t0
    return proc.returncode or 0, err.decode(), time.monotonic() - t0


async def test_commands_give_up_on_a_hanging_postgres(migrated_database_url: str) -> None:
    async with running_proxy(migrated_database_url) as proxy:
        proxy.hang()
        url = proxy.url_for(migrated_database_url)
        results = await asyncio.gather(*(run(url, *args) for args in COMMANDS))
    for args, (code, err, took) in zip(COMMANDS, results, strict=True):
        assert code not in (0, -1), (args, code, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert took < 30, (args, took)
