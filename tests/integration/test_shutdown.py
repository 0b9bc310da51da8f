"""Graceful shutdown of a real chatgate process on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.simulator import Simulator
from tests.integration.conftest import TEST_API_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Chatgate:
    """``chatgate serve`` as a child process."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, log_path: Path) -> None:
        self.proc = proc
        self.target = f"127.0.0.1:{port}"
        self.log_path = log_path

    async def exit_code(self) -> int:
        """Wait for the process to exit; its log is in the assertion message if it fails."""
        return await asyncio.wait_for(self.proc.wait(), timeout=15)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    async def health(self) -> int:
        async with grpc.aio.insecure_channel(self.target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
            return int(reply.status)


@pytest.fixture
async def chatgate(
    migrated_database_url: str, simulator: Simulator, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Chatgate]:
    grace = getattr(request, "param", "1.5")
    log_path = tmp_path / "chatgate.log"
    log_file = log_path.open("wb")
    port = free_port()
    env = {
        **os.environ,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": simulator.base_url,
        "DATABASE_URL": migrated_database_url,
        "CHATGATE_AUTH": "off",  # these tests are about processes, not callers
        "CHATGATE_LISTEN": f"127.0.0.1:{port}",
        # One process: these tests are about one server's behaviour (test_workers.py
        # covers the supervisor), and one process keeps them deterministic.
        "CHATGATE_WORKERS": "1",
        "CHATGATE_SHUTDOWN_GRACE_SECONDS": grace,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatgate_server", "serve", env=env, stderr=log_file
    )
    gate = Chatgate(proc, port, log_path)
    deadline = time.monotonic() + 20
    while True:
        try:
            if await gate.health() == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.aio.AioRpcError:
            pass
        assert proc.returncode is None, "chatgate exited during start-up"
        assert time.monotonic() < deadline, "chatgate did not become healthy"
        await asyncio.sleep(0.1)
    try:
        yield gate
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        log_file.close()


def req(model: str, request_id: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=model, user_id="u", request_id=request_id, messages=[pb.Message(role=pb.ROLE_USER, text="hi")]
    )


async def first_event(call: Any) -> str | None:
    event = await call.read()
    assert isinstance(event, pb.CompleteResponse)
    return event.WhichOneof("event")


async def drain_call(call: Any) -> tuple[list[pb.CompleteResponse], grpc.StatusCode]:
    events = []
    try:
        while True:
            event = await call.read()
            if not isinstance(event, pb.CompleteResponse):  # grpc.aio.EOF
                break
            events.append(event)
    except grpc.aio.AioRpcError as exc:
        return events, exc.code()
    return events, grpc.StatusCode.OK


def outcomes(database_url: str, ids: list[str]) -> dict[str, list[str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT request_id, outcome FROM usage_records WHERE request_id = ANY(%s)", (ids,)
        ).fetchall()
    result: dict[str, list[str]] = {i: [] for i in ids}
    for request_id, outcome in rows:
        result[request_id].append(outcome)
    return result


async def test_sigterm_drains_then_cuts_and_bills_every_stream(
    chatgate: Chatgate, simulator: Simulator, migrated_database_url: str
) -> None:
    prefix = uuid.uuid4().hex[:8]
    short_id, long_id, late_id = f"{prefix}-short", f"{prefix}-long", f"{prefix}-late"
    async with grpc.aio.insecure_channel(chatgate.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        short = stub.Complete(req("gpt-4o-mini::chunks=8,delay_ms=100", short_id), timeout=30)
        long = stub.Complete(req("gpt-4o-mini::chunks=300,delay_ms=50", long_id), timeout=30)
        assert await first_event(short) == "started"
        assert await first_event(long) == "started"

        chatgate.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        # Out of rotation: the port takes no new connection (clients got a GOAWAY), so a
        # fresh probe fails; CHATGATE_HEALTH_LISTEN answers NOT_SERVING (test_health_port.py).
        with pytest.raises(grpc.aio.AioRpcError) as probe:
            await chatgate.health()
        assert probe.value.code() == grpc.StatusCode.UNAVAILABLE

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Complete(req("gpt-4o-mini", late_id), timeout=5):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        short_events, short_code = await drain_call(short)
        long_events, long_code = await drain_call(long)

    assert short_code == grpc.StatusCode.OK
    assert short_events[-1].finished.outcome == pb.OUTCOME_COMPLETED
    assert long_code == grpc.StatusCode.UNAVAILABLE
    assert long_events[-1].finished.outcome == pb.OUTCOME_SHUTDOWN
    assert long_events[-1].finished.usage.output_tokens > 0

    assert await chatgate.exit_code() == 0, chatgate.log_tail()
    assert outcomes(migrated_database_url, [short_id, long_id, late_id]) == {
        short_id: ["completed"],
        long_id: ["shutdown"],
        late_id: [],  # never reached chatgate: its connection had a GOAWAY, the port was closed
    }
    await simulator.wait_idle(timeout=2)
    assert simulator.open_streams == 0


@pytest.mark.parametrize("chatgate", ["60"], indirect=True)
async def test_a_second_sigterm_cuts_at_once(
    chatgate: Chatgate, simulator: Simulator, migrated_database_url: str
) -> None:
    long_id = f"{uuid.uuid4().hex[:8]}-long"
    async with grpc.aio.insecure_channel(chatgate.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        long = stub.Complete(req("gpt-4o-mini::chunks=300,delay_ms=50", long_id), timeout=30)
        assert await first_event(long) == "started"
        chatgate.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        chatgate.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        events, code = await drain_call(long)
    assert code == grpc.StatusCode.UNAVAILABLE, chatgate.log_tail()
    assert events[-1].finished.outcome == pb.OUTCOME_SHUTDOWN
    assert await chatgate.exit_code() == 0, chatgate.log_tail()
    assert time.monotonic() - t0 < 10  # not the 60 s grace
    assert outcomes(migrated_database_url, [long_id]) == {long_id: ["shutdown"]}
