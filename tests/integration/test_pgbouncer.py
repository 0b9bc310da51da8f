"""chatgate behind a real PgBouncer in transaction mode (CHATGATE_DATABASE_TRANSACTION_POOLING).

Everything that touches Postgres goes through the pooler: migrations (two runners at
once), the caller table, request-id reservations, usage rows and their roll-up, and the
usage report. The pooler has fewer server connections than chatgate has client
connections, so any session state (a SET, a prepared statement after psycopg's fifth
execution, a session advisory lock) would land on the wrong server connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2

from chatgate.client import AsyncClient, ChatgateError, Outcome, build_request
from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import usage_pb2 as upb
from chatgate.v1 import usage_pb2_grpc
from chatgate_server.app import App
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import NO_TELEMETRY
from chatgate_server.usage.migrate import load_migrations
from tests.databases import throwaway_database
from tests.integration.conftest import make_settings
from tests.integration.pgbouncer import pgbouncer


@dataclass(frozen=True)
class Bounced:
    direct: str
    """The database itself, for the test's own checks."""
    pooled: str
    """The same database through PgBouncer, for chatgate."""


@pytest.fixture
def bounced(database_url: str) -> Iterator[Bounced]:
    with throwaway_database(database_url, "chatgate_bouncer") as direct, pgbouncer(direct) as pooled:
        yield Bounced(direct, pooled)


def chatgate(pooled_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": pooled_url, "CHATGATE_DATABASE_TRANSACTION_POOLING": "true"}
    return subprocess.run(
        [sys.executable, "-m", "chatgate_server", *args], env=env, capture_output=True, text=True, timeout=60
    )


def migrate_concurrently(pooled_url: str, runners: int) -> list[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "DATABASE_URL": pooled_url, "CHATGATE_DATABASE_TRANSACTION_POOLING": "true"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "chatgate_server", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(runners)
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(60), *p.communicate()) for p in procs]


def test_migrations_run_through_pgbouncer_even_two_at_once(bounced: Bounced) -> None:
    results = migrate_concurrently(bounced.pooled, 2)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    with psycopg.connect(bounced.direct) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(load_migrations()),)
        # No advisory lock left behind on any server connection: a third runner finishes.
    again = chatgate(bounced.pooled, "migrate")
    assert (again.returncode, again.stdout.strip()) == (0, "applied 0 migration(s)"), again.stderr


def request(request_id: str, user: str = "u-bouncer") -> pb.CompleteRequest:
    return build_request("gpt-4o-mini::chunks=3", "hi", user_id=user, request_id=request_id)


async def test_serving_through_pgbouncer_bills_every_call_once(
    bounced: Bounced, simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    assert chatgate(bounced.pooled, "migrate").returncode == 0
    created = chatgate(bounced.pooled, "callers", "create", "--tenant", "acme", "--name", "api")
    assert created.returncode == 0, created.stderr
    token = created.stdout.split()[0]
    settings = make_settings(
        bounced.pooled, simulator.base_url, auth="tokens", database_transaction_pooling=True
    )
    app = App(settings, telemetry=NO_TELEMETRY)
    await app.start()
    try:
        await calls_and_report(app, token, bounced)
    finally:
        await app.stop(0)
    # chatgate rides out database errors (reservations fail open, rows go to the spool),
    # so the calls above would succeed even if the pooler broke every statement: what
    # shows it did not is that nothing was logged about the database, at all.
    complaints = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and r.name.startswith(("chatgate_server.usage", "chatgate_server.auth"))
    ]
    assert complaints == []


async def calls_and_report(app: App, token: str, bounced: Bounced) -> None:
    ids = [f"bouncer-{uuid.uuid4().hex[:8]}-{i}" for i in range(160)]
    async with AsyncClient(f"127.0.0.1:{app.port}", token=token, timeout=20) as client:
        # Ten waves of sixteen calls: every pool runs its statements well past psycopg's
        # prepare threshold, on server connections PgBouncer keeps switching.
        for start in range(0, len(ids), 16):
            done = await asyncio.gather(*(client.collect(request(i)) for i in ids[start : start + 16]))
            assert {c.outcome for c in done} == {Outcome.COMPLETED}
            await asyncio.sleep(0.1)
        # The reservation of a served id is seen through the pooler too.
        with pytest.raises(ChatgateError) as refused:
            await client.collect(request(ids[0]))
        assert (refused.value.code, refused.value.reason) == (
            grpc.StatusCode.ALREADY_EXISTS,
            "DUPLICATE_REQUEST_ID",
        )
    # The usage report (its own pool) reads the rows back through the pooler.
    await asyncio.sleep(0.5)  # the ledger's batch linger
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        start_time = timestamp_pb2.Timestamp()
        start_time.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
        report = await usage_pb2_grpc.UsageServiceStub(channel).GetUsage(
            upb.GetUsageRequest(start_time=start_time),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    assert report.totals.requests >= len(ids)
    stats = app.ledger.stats() if app.ledger else None
    assert stats is not None and (stats.spooled, stats.dead_lettered) == (0, 0)  # straight to Postgres
    await app.stop()
    with psycopg.connect(bounced.direct) as conn:
        rows = conn.execute(
            "SELECT request_id, count(*) FROM usage_records WHERE request_id = ANY(%s) GROUP BY request_id",
            (ids,),
        ).fetchall()
    assert sorted(rows) == sorted((i, 1) for i in ids)
