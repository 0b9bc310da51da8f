"""Blocks on real servers: ``chatgate block`` refuses a user's calls (PERMISSION_DENIED,
reason BLOCKED, a rejected row) while other users pass; another server process on the
same database refuses them within 5 s too; ``unblock`` lifts it; a block ends by itself."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.limits import blocks_store
from chatgate_server.limits.blocks import BlockTable
from chatgate_server.limits.blocks_records import Scope, Source, Subject
from chatgate_server.simulator import Simulator
from tests.integration.conftest import TEST_API_KEY, AppFactory
from tests.integration.pgproxy import running_proxy
from tests.integration.test_edge import details
from tests.integration.test_workers import free_port, serving

# Every process polls the block version each second: 5 s is the promise, with room.
PROMISE_S = 5.0


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatgate_server", *args],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def run_cli(url: str, *args: str) -> str:
    ran = await asyncio.to_thread(cli, url, *args)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


async def outcome(target: str, user: str) -> tuple[str, str, str]:
    """One call as ``user``: ("OK", "", "") or (status, ErrorInfo reason, message)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = pb.CompleteRequest(
            model="gpt-4o-mini::chunks=2", user_id=user, messages=[pb.Message(role=pb.ROLE_USER, text="hi")]
        )
        try:
            events = [e async for e in stub.Complete(request, timeout=10)]
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, details(exc)[0], exc.details() or ""
    assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
    return "OK", "", ""


async def until_status(
    target: str, user: str, status: str, within_s: float
) -> tuple[float, tuple[str, str, str]]:
    """Call as ``user`` until the call ends with ``status``; how long it took, and the end."""
    t0 = time.monotonic()
    while True:
        got = await outcome(target, user)
        waited = time.monotonic() - t0
        if got[0] == status or waited > within_s:
            return waited, got
        await asyncio.sleep(0.1)


@pytest.fixture
def second_server(migrated_database_url: str, simulator: Simulator, tmp_path: Path) -> Iterator[str]:
    """Another chatgate process on the same database; its address."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": simulator.base_url,
        "DATABASE_URL": migrated_database_url,
        "CHATGATE_AUTH": "off",
        "CHATGATE_LISTEN": target,
        "CHATGATE_SHUTDOWN_GRACE_SECONDS": "1",
        "CHATGATE_SPOOL_DIR": str(tmp_path / "spool"),
    }
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatgate_server", "serve", "--workers", "1"],
            env=env,
            stderr=out,
            text=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not serving(target):
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the second chatgate did not start"
            time.sleep(0.1)
        yield target
    finally:
        proc.terminate()
        proc.wait(timeout=20)


async def test_a_blocked_user_is_refused_everywhere_within_5s_and_unblocked(
    start_app: AppFactory,
    second_server: str,
    migrated_database_url: str,
    db: psycopg.Connection[tuple[object, ...]],
) -> None:
    # The simulator both servers call lives in this event loop: every wait here is async
    # (the CLI runs in a thread) so that it keeps answering.
    app = await start_app()
    here = f"127.0.0.1:{app.port}"
    user, other = f"u-{uuid.uuid4().hex[:8]}", f"u-{uuid.uuid4().hex[:8]}"
    assert (await outcome(here, user))[0] == "OK"
    assert (await outcome(second_server, user))[0] == "OK"

    said = await run_cli(
        migrated_database_url,
        "block",
        "user",
        f"default/{user}",
        "--for",
        "1h",
        "--reason",
        "scraping, ticket 9",
    )
    assert f"blocked user default/{user}" in said
    for target in (here, second_server):
        waited, (status, reason, message) = await until_status(target, user, "PERMISSION_DENIED", PROMISE_S)
        assert (status, reason) == ("PERMISSION_DENIED", "BLOCKED"), (target, waited, message)
        assert waited < PROMISE_S
        assert message.startswith(f"user default/{user} is blocked until 20") and message.endswith(
            ": scraping, ticket 9"
        )
        assert (await outcome(target, other))[0] == "OK"  # other users pass

    # A refused call leaves a rejected row (admission.py), so abuse shows in reports.
    deadline = time.monotonic() + 10
    rows: list[tuple[object, ...]] = []
    while time.monotonic() < deadline and len(rows) < 2:
        rows = db.execute(
            "SELECT outcome, grpc_status, total_tokens, cost_usd_micros FROM usage_records"
            " WHERE user_id = %s AND outcome = 'rejected'",
            (user,),
        ).fetchall()
        await asyncio.sleep(0.2)
    assert rows and set(rows) == {("rejected", "PERMISSION_DENIED", 0, 0)}

    listing = await run_cli(migrated_database_url, "blocks")
    assert f"user default/{user}" in listing and "scraping, ticket 9" in listing

    await run_cli(
        migrated_database_url, "unblock", "user", f"default/{user}", "--reason", "sorted out", "--by", "bob"
    )
    for target in (here, second_server):
        waited, got = await until_status(target, user, "OK", PROMISE_S)
        assert got[0] == "OK" and waited < PROMISE_S, (target, got)

    history = await run_cli(migrated_database_url, "blocks", "history", "--tenant", "default")
    lines = [line for line in history.splitlines() if user in line]
    assert len(lines) == 2
    assert "unblock" in lines[0] and "bob" in lines[0] and "sorted out" in lines[0]
    assert " block " in lines[1] and "scraping, ticket 9" in lines[1]


async def test_a_block_ends_by_itself(start_app: AppFactory, migrated_database_url: str) -> None:
    app = await start_app()
    here = f"127.0.0.1:{app.port}"
    user = f"u-{uuid.uuid4().hex[:8]}"
    async with AsyncConnectionPool(migrated_database_url, min_size=1, max_size=1, open=False) as pool:
        await pool.open(wait=True, timeout=10)
        now = datetime.now(UTC)
        async with pool.connection() as conn, conn.transaction():
            await blocks_store.block(
                conn,
                Subject(Scope.USER, "default", user),
                source=Source.OPERATOR,
                reason="cool down",
                actor="test",
                now=now,
                expires_at=now + timedelta(seconds=3),
            )
    _, (status, reason, _) = await until_status(here, user, "PERMISSION_DENIED", PROMISE_S)
    assert (status, reason) == ("PERMISSION_DENIED", "BLOCKED")
    _, got = await until_status(here, user, "OK", 10)
    assert got[0] == "OK"
    assert datetime.now(UTC) >= now + timedelta(seconds=3)  # not before its end


def test_block_commands_refuse_what_they_cannot_mean(migrated_database_url: str) -> None:
    bad = cli(migrated_database_url, "block", "user", "no-tenant", "--reason", "x")
    assert bad.returncode == 2 and "<tenant>/<user>" in bad.stderr
    missing = cli(migrated_database_url, "block", "tenant", "acme")
    assert missing.returncode == 2 and "--reason" in missing.stderr
    nothing = cli(migrated_database_url, "unblock", "tenant", f"t-{uuid.uuid4().hex[:6]}")
    assert nothing.returncode == 1 and "was not blocked" in nothing.stdout


async def block_now(
    url: str, subject: Subject, *, until: datetime | None, source: Source = Source.OPERATOR, reason: str = "x"
) -> bool:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn, conn.transaction():
        return await blocks_store.block(
            conn, subject, source=source, reason=reason, actor="test", now=datetime.now(UTC), expires_at=until
        )


async def test_while_postgres_is_away_the_loaded_blocks_keep_applying_and_ending(
    migrated_database_url: str,
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    forever, brief = Subject(Scope.USER, tenant, "u-forever"), Subject(Scope.USER, tenant, "u-brief")
    await block_now(migrated_database_url, forever, until=None)
    await block_now(migrated_database_url, brief, until=datetime.now(UTC) + timedelta(seconds=2))
    async with running_proxy(migrated_database_url) as proxy:
        url = proxy.url_for(migrated_database_url)
        async with AsyncConnectionPool(url, min_size=1, max_size=1, open=False, timeout=1) as pool:
            await pool.open(wait=True, timeout=10)
            table = BlockTable(pool, poll_s=0.1)
            await table.start(5)
            try:
                assert table.blocking(tenant, "c", "u-forever", datetime.now(UTC)) is not None
                assert table.blocking(tenant, "c", "u-brief", datetime.now(UTC)) is not None
                proxy.cut()
                await asyncio.sleep(2.5)  # polls fail meanwhile; the brief block ends
                assert table.blocking(tenant, "c", "u-forever", datetime.now(UTC)) is not None
                assert table.blocking(tenant, "c", "u-brief", datetime.now(UTC)) is None
                # Back: an unblock made meanwhile reaches the table.
                async with await psycopg.AsyncConnection.connect(
                    migrated_database_url, autocommit=True
                ) as conn:
                    await blocks_store.unblock(conn, forever, actor="test", reason="", now=datetime.now(UTC))
                await asyncio.sleep(0.5)  # unseen while Postgres is away from this process
                assert table.blocking(tenant, "c", "u-forever", datetime.now(UTC)) is not None
                proxy.restore()
                deadline = time.monotonic() + 10
                while table.blocking(tenant, "c", "u-forever", datetime.now(UTC)) is not None:
                    assert time.monotonic() < deadline, "the table did not reload after the outage"
                    await asyncio.sleep(0.1)
            finally:
                await table.stop()


async def test_the_detector_only_lengthens_a_block(migrated_database_url: str) -> None:
    now = datetime.now(UTC)
    operator = Subject(Scope.USER, f"t-{uuid.uuid4().hex[:8]}", "u-1")
    await block_now(migrated_database_url, operator, until=None, reason="operator")
    assert not await block_now(
        migrated_database_url, operator, until=now + timedelta(hours=1), source=Source.DETECTOR
    )
    timed = Subject(Scope.USER, operator.tenant, "u-2")
    await block_now(migrated_database_url, timed, until=now + timedelta(hours=2), reason="operator")
    assert not await block_now(
        migrated_database_url, timed, until=now + timedelta(hours=1), source=Source.DETECTOR
    )
    assert await block_now(
        migrated_database_url, timed, until=now + timedelta(hours=3), source=Source.DETECTOR
    )
    with psycopg.connect(migrated_database_url) as conn:
        rows = conn.execute(
            "SELECT subject, source, expires_at FROM blocks WHERE tenant = %s ORDER BY subject",
            (operator.tenant,),
        ).fetchall()
        audited = conn.execute(
            "SELECT count(*) FROM block_audit WHERE tenant = %s", (operator.tenant,)
        ).fetchone()
    assert rows == [("u-1", "operator", None), ("u-2", "detector", now + timedelta(hours=3))]
    assert audited == (3,)  # two operator blocks and the one detector block that changed something
    with psycopg.connect(migrated_database_url) as conn, pytest.raises(psycopg.errors.RaiseException):
        conn.execute("DELETE FROM block_audit WHERE tenant = %s", (operator.tenant,))


async def test_tenant_and_caller_blocks_follow_the_credential(
    start_app: AppFactory, migrated_database_url: str
) -> None:
    from chatgate_server.auth.store import CallerStore
    from tests.integration.test_auth import bearer, complete, new_token, refused, unique

    acme, globex = unique("acme"), unique("globex")
    async with AsyncConnectionPool(migrated_database_url, min_size=1, max_size=1, open=False) as pool:
        await pool.open(wait=True, timeout=10)
        store = CallerStore(pool)
        billing, search, other = (
            bearer(await new_token(store, acme, "billing")),
            bearer(await new_token(store, acme, "search")),
            bearer(await new_token(store, globex, "billing")),
        )
    app = await start_app(auth="tokens")
    table = app.blocks
    assert table is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        await block_now(
            migrated_database_url, Subject(Scope.CALLER, acme, "billing"), until=None, reason="leak"
        )
        await table.refresh()  # no need to wait for the poll here
        got = await refused(channel, billing)
        assert (got.code, got.reason) == (grpc.StatusCode.PERMISSION_DENIED, "BLOCKED")
        assert got.message == f"caller {acme}/billing is blocked until unblocked: leak"
        await complete(channel, search)  # the tenant's other caller
        await complete(channel, other)  # a caller of the same name in another tenant

        await block_now(migrated_database_url, Subject(Scope.TENANT, acme), until=None, reason="unpaid")
        await table.refresh()
        for creds in (billing, search):
            got = await refused(channel, creds)
            assert got.reason == "BLOCKED" and got.message.startswith(f"tenant {acme} is blocked")
        await complete(channel, other)
