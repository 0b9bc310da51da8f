"""Limits across processes that share only Postgres: three real ``chatgate serve``
processes hold one tenant's rate and one user's daily budget together, and a killed
process's lease returns to the pool after its expiry."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.simulator import Simulator
from tests.databases import throwaway_database
from tests.integration.conftest import TEST_API_KEY
from tests.integration.test_workers import free_port, serving

TENANT = "default"  # authentication is off: every call is the anonymous caller's


@pytest.fixture
def fresh_db() -> Iterator[str]:
    """A database of its own: these limits apply to the whole anonymous tenant."""
    admin = os.environ["DATABASE_URL"]
    with throwaway_database(admin, "chatgate_limits", migrate=True) as url:
        yield url


def start(url: str, base_url: str, port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    full = {
        **os.environ,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": base_url,
        "DATABASE_URL": url,
        "CHATGATE_AUTH": "off",
        "CHATGATE_LISTEN": f"127.0.0.1:{port}",
        "CHATGATE_SHUTDOWN_GRACE_SECONDS": "1",
        "CHATGATE_SPOOL_DIR": tempfile.mkdtemp(prefix="chatgate-spool-"),
        "CHATGATE_RETRY_MAX_ATTEMPTS": "1",
        "CHATGATE_LOG_LEVEL": "WARNING",
        **env,
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "chatgate_server", "serve", "--workers", "1"],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@asynccontextmanager
async def servers(
    url: str, base_url: str, count: int, tmp: Path, **env: str
) -> AsyncIterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    started = []
    for i in range(count):
        port = free_port()
        started.append((port, start(url, base_url, port, tmp / f"server{i}.log", **env)))
    try:
        deadline = time.monotonic() + 30
        for port, proc in started:
            while not await asyncio.to_thread(serving, f"127.0.0.1:{port}"):
                assert proc.poll() is None, (tmp / "server0.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "server did not start"
                await asyncio.sleep(0.2)
        yield started
    finally:
        for _, proc in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def set_limit(url: str, scope: str, subject: str, kind: str, amount: int, model: str = "") -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO limits (scope, tenant, subject, model, kind, amount)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (scope, TENANT, subject, model, kind, amount),
        )


def request(user: str, model: str, max_tokens: int = 20) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=model,
        user_id=user,
        max_completion_tokens=max_tokens,
        messages=[pb.Message(role=pb.ROLE_USER, text="Name a colour.")],
    )


async def call(stub: Any, req: pb.CompleteRequest) -> grpc.StatusCode:
    try:
        async for _ in stub.Complete(req, timeout=30):
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def db_rows(url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


async def test_three_processes_hold_a_tenant_rate_and_a_user_budget_together(
    fresh_db: str, tmp_path: Path
) -> None:
    rpm, budget = 60, 3000
    # The rate limits the tenant's gpt-4o-mini calls; the budget one user's gpt-4o calls:
    # both enforced at once by all three processes.
    set_limit(fresh_db, "tenant", "", "requests_per_minute", rpm, model="gpt-4o-mini")
    set_limit(fresh_db, "user", "hot", "tokens_per_day", budget)
    sim = Simulator(chunks=3)
    await sim.start(host="127.0.0.1", port=0)
    try:
        async with servers(fresh_db, sim.base_url, 3, tmp_path) as started:
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port, _ in started]
            stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
            admitted_rate: list[float] = []
            stop_at = time.monotonic() + 12

            async def rate_worker(i: int) -> None:
                while time.monotonic() < stop_at:
                    t = time.monotonic()
                    code = await call(stubs[i % 3], request(f"user-{i}", "gpt-4o-mini"))
                    if code == grpc.StatusCode.OK:
                        admitted_rate.append(t)
                    else:
                        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                        await asyncio.sleep(0.05)

            async def budget_worker(i: int) -> None:
                while time.monotonic() < stop_at:
                    code = await call(stubs[i % 3], request("hot", "gpt-4o"))
                    if code != grpc.StatusCode.OK:
                        await asyncio.sleep(0.05)

            began = time.monotonic()
            await asyncio.gather(*(rate_worker(i) for i in range(6)), *(budget_worker(i) for i in range(6)))
            elapsed = time.monotonic() - began
            for channel in channels:
                await channel.close()
    finally:
        await sim.stop()

    # Rate: a bucket of 60 refilled at 1/s allows 60 + elapsed calls in the run.
    allowed = rpm + rpm / 60 * elapsed
    print(f"rate: {len(admitted_rate)} admitted of {allowed:.0f} allowed in {elapsed:.1f}s")
    assert 0.95 * allowed <= len(admitted_rate) <= allowed + 1
    # Budget: what the user's calls recorded, against the day's tokens (the processes
    # flushed their ledgers at SIGTERM).
    ((spent, calls),) = db_rows(
        fresh_db,
        "SELECT coalesce(sum(total_tokens), 0), count(*) FROM usage_records"
        " WHERE user_id = 'hot' AND outcome = 'completed'",
    )
    print(f"budget: {spent} tokens of {budget} in {calls} calls")
    assert 0.95 * budget <= spent <= budget


async def test_a_killed_processs_lease_returns_after_its_expiry(fresh_db: str, tmp_path: Path) -> None:
    set_limit(fresh_db, "user", "u-kill", "concurrent_streams", 2)
    sim = Simulator(chunks=200, delay_ms=50)  # streams that run ~10 s
    await sim.start(host="127.0.0.1", port=0)
    try:
        async with servers(
            fresh_db, sim.base_url, 2, tmp_path, CHATGATE_LIMITS_LEASE_TTL_SECONDS="2"
        ) as started:
            (port_a, proc_a), (port_b, _) = started
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{port_a}") as chan_a,
                grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as chan_b,
            ):
                a, b = chat_pb2_grpc.ChatServiceStub(chan_a), chat_pb2_grpc.ChatServiceStub(chan_b)
                streams = [a.Complete(request("u-kill", "gpt-4o-mini", 1000), timeout=30) for _ in range(2)]
                for stream in streams:
                    await stream.read()  # both slots are held by process A
                assert await call(b, request("u-kill", "gpt-4o-mini")) == grpc.StatusCode.RESOURCE_EXHAUSTED

                proc_a.send_signal(signal.SIGKILL)  # no shutdown: nothing given back
                proc_a.wait()
                killed_at = time.monotonic()
                # Its lease stays until it expires (2 s), then B's heartbeat reclaims it.
                while await call(b, request("u-kill", "gpt-4o-mini")) != grpc.StatusCode.OK:
                    assert time.monotonic() - killed_at < 8, "the dead process's slots never came back"
                    await asyncio.sleep(0.2)
                waited = time.monotonic() - killed_at
                print(f"slots back {waited:.1f}s after the kill")
                assert waited >= 1.0  # not before the lease expired
    finally:
        await sim.stop()
