"""An end-user id is the caller's to choose, and the operator commands print it. One
holding terminal escapes (clear the screen, set the clipboard with OSC 52, retitle the
window) or a bidi override reaches the operator's terminal spelled out, never acting —
through a real call, its usage row, ``chatgate usage`` and ``chatgate blocks``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
from psycopg_pool import AsyncConnectionPool

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.limits import blocks_store
from chatgate_server.limits.blocks_records import Scope, Source, Subject
from chatgate_server.terminal import shown
from tests.integration.conftest import AppFactory

CLIPBOARD = "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # OSC 52: "set the clipboard"
CLEAR = "\x1b[2J\x1b[H"
TITLE = "\x1b]0;all good\x07"
RTL = "\u202e"  # right-to-left override: the rest reads backwards
EVIL_USER = f"u-{CLIPBOARD}{CLEAR}{TITLE}{RTL}gnp.exe"
ACTING = ("\x1b", "\x07", RTL)


def cli(url: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHATGATE_"))}
    ran = subprocess.run(
        [sys.executable, "-m", "chatgate_server", *args],
        env={**env, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


def test_shown_spells_out_what_would_act_and_keeps_the_rest() -> None:
    assert shown("alice@example.com") == "alice@example.com"
    assert shown("é 東京 🙂") == "é 東京 🙂"  # printable beyond ASCII stays as it is
    assert shown("a\x1b[2Jb\x07\x9b\u202e\U000e0001") == "a\\x1b[2Jb\\x07\\x9b\\u202e\\U000e0001"
    assert not any(c in shown(EVIL_USER) for c in ACTING)


async def test_a_user_id_with_escapes_reaches_the_operator_spelled_out(
    start_app: AppFactory, migrated_database_url: str
) -> None:
    app = await start_app()
    request_id = f"term-{uuid.uuid4().hex}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = pb.CompleteRequest(
            model="gpt-4o-mini::chunks=2",
            user_id=EVIL_USER,
            request_id=request_id,
            messages=[pb.Message(role=pb.ROLE_USER, text="hi")],
        )
        events = [e async for e in stub.Complete(request, timeout=10)]
    assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
    tenant = await _tenant_of(migrated_database_url, request_id)

    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    report = await asyncio.to_thread(
        cli, migrated_database_url, "usage", "--since", since, "--tenant", tenant, "--by", "user"
    )
    assert not any(c in report for c in ACTING), report
    assert shown(EVIL_USER) in report  # the row is there, readable

    # The detector blocks such a user with its id in the subject and the reason.
    pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]] = AsyncConnectionPool(
        migrated_database_url, min_size=1, max_size=1, open=False
    )
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn, conn.transaction():
            await blocks_store.block(
                conn,
                Subject(Scope.USER, tenant, EVIL_USER),
                source=Source.DETECTOR,
                reason=f"spend spike of {EVIL_USER}",
                actor="detector",
                now=datetime.now(UTC),
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
    finally:
        await pool.close()
    for view in (["blocks", "--tenant", tenant], ["blocks", "history", "--tenant", tenant]):
        listing = await asyncio.to_thread(cli, migrated_database_url, *view)
        assert not any(c in listing for c in ACTING), listing
        assert shown(EVIL_USER) in listing


async def _tenant_of(url: str, request_id: str) -> str:
    """The tenant of the call's usage row, once the ledger wrote it."""
    until = time.monotonic() + 10
    while time.monotonic() < until:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            found = await (
                await conn.execute("SELECT tenant FROM usage_records WHERE request_id = %s", (request_id,))
            ).fetchone()
        if found:
            return str(found[0])
        await asyncio.sleep(0.1)
    raise AssertionError(f"no usage row for {request_id}")
