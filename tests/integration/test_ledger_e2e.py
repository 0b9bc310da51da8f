"""The ledger under a real chatgate: many streams, Postgres going away, a kill and a restart.

A gRPC client streams through chatgate to the simulator; Postgres sits behind a TCP
proxy the test cuts. What a user notices is checked: streams complete, health and the
spool metric say what is going on, and every request ends up as exactly one row.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.rpc.health_probe import LIVENESS_SERVICE
from chatgate_server.rpc.ledger_health import LEDGER_HEALTH_SERVICE
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import NO_TELEMETRY, Telemetry
from chatgate_server.usage.ledger import LedgerState
from chatgate_server.usage.spool import decode_lines
from tests.integration.conftest import TEST_API_KEY, make_settings
from tests.integration.pgproxy import PgProxy, running_proxy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def proxy(migrated_database_url: str) -> AsyncIterator[PgProxy]:
    async with running_proxy(migrated_database_url) as p:
        yield p


Gate = Callable[..., Awaitable[App]]


@pytest.fixture
async def start_gate(simulator: Simulator) -> AsyncIterator[Gate]:
    """Start chatgate on a given database URL (here: through the proxy); stopped afterwards."""
    apps: list[App] = []

    async def factory(database_url: str, telemetry: Telemetry | None = None, **overrides: Any) -> App:
        app = App(
            make_settings(database_url, simulator.base_url, **overrides), telemetry=telemetry or NO_TELEMETRY
        )
        await app.start()
        apps.append(app)
        return app

    try:
        yield factory
    finally:
        for app in apps:
            await app.stop(0)


def request(user_id: str, model: str = "gpt-4o-mini", **fields: Any) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=model, user_id=user_id, messages=[pb.Message(role=pb.ROLE_USER, text="Hello!")], **fields
    )


async def stream(stub: chat_pb2_grpc.ChatServiceStub, req: pb.CompleteRequest) -> list[pb.CompleteResponse]:
    return [e async for e in stub.Complete(req, timeout=60)]  # type: ignore[attr-defined]


def rows_of(url: str, user_id: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT request_id, count(*) FROM usage_records WHERE user_id = %s GROUP BY 1", [user_id]
        ).fetchall()
    return {str(r): int(n) for r, n in rows}


def sums_of(url: str, user_id: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(rows, roll-up) sums of requests, input, output, cached, reasoning, total tokens, cost."""
    columns = (
        "input_tokens), sum(output_tokens), sum(cached_input_tokens), sum(reasoning_tokens), sum(total_tokens"
    )
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f"SELECT count(*), sum({columns}), sum(cost_usd_micros) FROM usage_records WHERE user_id = %s",
            [user_id],
        ).fetchone()
        daily = conn.execute(
            f"SELECT sum(requests), sum({columns}), sum(cost_usd_micros) FROM usage_daily WHERE user_id = %s",
            [user_id],
        ).fetchone()
    assert rows is not None and daily is not None
    return tuple(rows), tuple(daily)


async def rest_of(call: Any) -> list[pb.CompleteResponse]:
    """The events after the first, read with read() (a call cannot mix read() and iteration)."""
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def health(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


async def settled_health(app: App) -> None:
    assert app.ledger_health is not None
    await app.ledger_health.settled()


def metric(reader: InMemoryMetricReader, name: str) -> float:
    data = reader.get_metrics_data()
    assert data is not None
    [value] = [
        getattr(point, "value", None)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == name
        for point in m.data.data_points
    ]
    assert isinstance(value, int | float), value
    return float(value)


async def test_1000_concurrent_streams_make_1000_rows_and_rollups_that_sum_to_them(
    app: App, migrated_database_url: str
) -> None:
    user = f"load-{uuid.uuid4().hex[:8]}"
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") for _ in range(10)]
    try:
        stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
        results = await asyncio.gather(
            *(stream(stubs[i % 10], request(user, tags={"n": str(i % 7)})) for i in range(1000))
        )
    finally:
        for c in channels:
            await c.close()
    assert all(r[-1].finished.outcome == pb.OUTCOME_COMPLETED for r in results)
    request_ids = {r[0].started.request_id for r in results}
    assert len(request_ids) == 1000

    assert app.ledger is not None
    await app.ledger.flush()
    assert rows_of(migrated_database_url, user) == dict.fromkeys(request_ids, 1)
    rows, daily = sums_of(migrated_database_url, user)
    assert rows == daily
    assert rows[0] == 1000
    # And the totals are what the callers were told in their final events.
    assert rows[5] == sum(r[-1].finished.usage.total_tokens for r in results)
    assert rows[6] == sum(r[-1].finished.cost.usd_micros for r in results)


async def test_streams_keep_flowing_while_postgres_is_away_and_every_row_lands_once(
    start_gate: Gate, proxy: PgProxy, migrated_database_url: str
) -> None:
    reader = InMemoryMetricReader()
    app = await start_gate(
        proxy.url_for(migrated_database_url),
        telemetry=Telemetry(meter_provider=MeterProvider(metric_readers=[reader])),
        ledger_write_timeout_s=1.0,
        ledger_retry_cap_s=0.3,
    )
    assert app.port is not None and app.ledger is not None
    user = f"outage-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await stream(stub, request(user))  # a warm pool, a row written normally
        await app.ledger.flush()

        # Postgres goes away while 100 long streams are flowing; 100 more start after.
        calls = [
            stub.Complete(request(user, "gpt-4o-mini::chunks=100,delay_ms=20"), timeout=60)
            for _ in range(100)
        ]
        firsts = await asyncio.gather(*(c.read() for c in calls))
        assert all(isinstance(f, pb.CompleteResponse) and f.HasField("started") for f in firsts)
        proxy.cut()
        results = await asyncio.gather(
            *(rest_of(c) for c in calls), *(stream(stub, request(user)) for _ in range(100))
        )
        assert all(r[-1].finished.outcome == pb.OUTCOME_COMPLETED for r in results)
        await app.ledger.flush()
        await settled_health(app)
        stats = app.ledger.stats()
        assert stats.state is LedgerState.SPOOLING
        # Every record is in Postgres (the warm-up, and any long stream that somehow ended
        # before the cut) or in the spool: surely the 100 that started after the cut. A
        # row can be in both (a commit whose answer the cut lost, or a write slow enough
        # to be spooled while it went on); the replay then stores nothing twice.
        in_postgres = len(rows_of(migrated_database_url, user))
        assert in_postgres + stats.spooled_records >= 201
        assert stats.spooled_records >= 100
        assert metric(reader, "chatgate.ledger.spool_records") == stats.spooled_records
        assert metric(reader, "chatgate.ledger.state") == float(LedgerState.SPOOLING)
        assert await health(app.port, LEDGER_HEALTH_SERVICE) == NOT_SERVING
        assert await health(app.port) == SERVING  # still serving: spooling loses nothing

        proxy.restore()
        async with asyncio.timeout(30):
            await app.ledger.wait_stored()
        await settled_health(app)
        assert await health(app.port, LEDGER_HEALTH_SERVICE) == SERVING
        assert metric(reader, "chatgate.ledger.spool_records") == 0
    rows = rows_of(migrated_database_url, user)
    assert len(rows) == 201 and set(rows.values()) == {1}
    totals, daily = sums_of(migrated_database_url, user)
    assert totals == daily


async def test_calls_are_refused_with_unavailable_while_queue_and_spool_are_full(
    start_gate: Gate, proxy: PgProxy, migrated_database_url: str
) -> None:
    app = await start_gate(
        proxy.url_for(migrated_database_url),
        ledger_queue_size=3,
        spool_max_bytes=1,
        ledger_write_timeout_s=0.5,
        ledger_retry_cap_s=0.2,
    )
    assert app.port is not None and app.ledger is not None
    user = f"full-{uuid.uuid4().hex[:8]}"
    full = asyncio.Event()
    app.ledger.add_listener(lambda state: full.set() if state is LedgerState.FULL else None)
    proxy.cut()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        # Calls admitted while there was room are served and their rows kept, until the
        # first batch has filled the spool and three more rows fill the queue...
        served: list[str] = []
        while not full.is_set():
            assert len(served) < 500, "the ledger never filled up"
            try:
                served.append((await stream(stub, request(user)))[0].started.request_id)
            except grpc.aio.AioRpcError as exc:
                # The ledger can fill between the check above and this call's admission.
                if exc.code() == grpc.StatusCode.UNAVAILABLE and full.is_set():
                    break
                raise
        # ...then nothing can take another row: new calls are refused.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stream(stub, request(user))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "usage ledger full" in (refused.value.details() or "")
        await settled_health(app)
        assert await health(app.port) == NOT_SERVING
        assert await health(app.port, "chatgate.v1.ChatService") == NOT_SERVING
        # Liveness stays up: restarting a replica brings no Postgres back, and would lose
        # the rows its queue holds.
        assert await health(app.port, LIVENESS_SERVICE) == SERVING

        proxy.restore()
        async with asyncio.timeout(30):
            await app.ledger.wait_stored()
        await settled_health(app)
        assert await health(app.port) == SERVING
        served.append((await stream(stub, request(user)))[0].started.request_id)
        await app.ledger.flush()
    # Every call that was served is billed once; the refused one left no row.
    assert rows_of(migrated_database_url, user) == dict.fromkeys(served, 1)


async def test_postgres_away_at_start_up_serves_and_spools(
    start_gate: Gate, proxy: PgProxy, migrated_database_url: str
) -> None:
    proxy.cut()
    app = await start_gate(
        proxy.url_for(migrated_database_url), ledger_write_timeout_s=0.5, ledger_retry_cap_s=0.2
    )
    assert app.port is not None and app.ledger is not None
    await settled_health(app)
    assert await health(app.port) == SERVING
    assert await health(app.port, LEDGER_HEALTH_SERVICE) == NOT_SERVING
    user = f"cold-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        events = await stream(chat_pb2_grpc.ChatServiceStub(channel), request(user))
    await app.ledger.flush()
    assert app.ledger.stats().spooled_records == 1
    proxy.restore()
    async with asyncio.timeout(30):
        await app.ledger.wait_stored()
    assert rows_of(migrated_database_url, user) == {events[0].started.request_id: 1}


# --- a real process, killed with records in its spool -------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spooled(spool_dir: Path) -> int:
    return sum(len(decode_lines(p.read_bytes(), p.name)) for p in spool_dir.glob("slot-*/segment-*"))


def poll(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def test_killed_with_records_in_the_spool_a_restart_lands_them(
    start_gate: Gate,
    proxy: PgProxy,
    simulator: Simulator,
    migrated_database_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spool_dir = tmp_path / "spool"
    port = free_port()
    env = {
        **os.environ,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": simulator.base_url,
        "DATABASE_URL": proxy.url_for(migrated_database_url),
        "CHATGATE_AUTH": "off",  # these tests are about processes, not callers
        "CHATGATE_LISTEN": f"127.0.0.1:{port}",
        "CHATGATE_SPOOL_DIR": str(spool_dir),
        "CHATGATE_LEDGER_WRITE_TIMEOUT_SECONDS": "0.5",
        "CHATGATE_LEDGER_RETRY_CAP_SECONDS": "0.5",
    }
    proxy.cut()
    # One process (--workers 1 serves in-process): with a supervisor, SIGKILL would reach
    # only the supervisor, and its workers would shut down gracefully instead of dying.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatgate_server", "serve", "--workers", "1",
        env=env, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    user = f"restart-{uuid.uuid4().hex[:8]}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if await health(port) == SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            assert proc.returncode is None, "chatgate exited during start-up"
            assert time.monotonic() < deadline, "chatgate did not become healthy"
            await asyncio.sleep(0.1)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            results = await asyncio.gather(*(stream(stub, request(user)) for _ in range(40)))
        request_ids = {r[0].started.request_id for r in results}
        await asyncio.to_thread(poll, lambda: spooled(spool_dir) == 40, "40 records in the spool")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: only the disk remembers
        await proc.wait()
    # It died in the middle of writing one more line.
    [segment] = sorted(spool_dir.glob("slot-*/segment-*"))
    with segment.open("ab") as f:
        f.write(b'1234abcd {"v": 1, "request_id": "half-writ')
    assert rows_of(migrated_database_url, user) == {}

    proxy.restore()
    caplog.set_level("WARNING", logger="chatgate_server.usage.spool")
    app = await start_gate(proxy.url_for(migrated_database_url), spool_dir=spool_dir)
    assert app.ledger is not None
    async with asyncio.timeout(30):
        await app.ledger.wait_stored()
    assert rows_of(migrated_database_url, user) == dict.fromkeys(request_ids, 1)
    assert "torn last line" in caplog.text
    assert not list(spool_dir.glob("slot-*/segment-*"))


async def chatgate_health(port: int, *args: str) -> tuple[int, str]:
    """``chatgate health`` (the container health check) against ``port``: (exit code, output)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatgate_server", "health", "--address", f"127.0.0.1:{port}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode()


async def test_the_container_health_check_covers_the_ledger(
    proxy: PgProxy, start_gate: Gate, migrated_database_url: str
) -> None:
    """``chatgate health --ledger`` (the image's HEALTHCHECK) fails while rows wait in the
    spool; plain ``chatgate health`` still passes, since the replica serves."""
    app = await start_gate(
        proxy.url_for(migrated_database_url), ledger_write_timeout_s=1.0, ledger_retry_cap_s=0.3
    )
    assert app.port is not None and app.ledger is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await stream(stub, request(f"u-{uuid.uuid4().hex[:8]}"))
        await app.ledger.flush()
        await settled_health(app)
        assert await chatgate_health(app.port, "--ledger") == (0, "SERVING\nchatgate.ledger: SERVING\n")

        proxy.cut()
        await stream(stub, request(f"u-{uuid.uuid4().hex[:8]}"))
        await app.ledger.flush()
        await settled_health(app)
        assert app.ledger.stats().state is LedgerState.SPOOLING
        assert await chatgate_health(app.port) == (0, "SERVING\n")
        assert await chatgate_health(app.port, "--ledger") == (1, "SERVING\nchatgate.ledger: NOT_SERVING\n")
        proxy.restore()
