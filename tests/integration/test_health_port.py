"""The plaintext health port (CHATGATE_HEALTH_LISTEN) and ``chatgate prestop``.

Under mTLS a kubelet gRPC probe cannot present a certificate, so health is also served
on a plaintext port that carries nothing else. ``chatgate prestop`` (a preStop hook)
turns every health status NOT_SERVING while calls keep being served until SIGTERM, for
one process and for every worker of a supervisor.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.rpc.edge import CHAT_SERVICE
from chatgate_server.rpc.ledger_health import LEDGER_HEALTH_SERVICE
from chatgate_server.simulator import Simulator
from tests.certs import Authority
from tests.integration.replicas import Replica, free_port, health_status

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def request(user: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="gpt-4o-mini::chunks=3", user_id=user, messages=[pb.Message(role=pb.ROLE_USER, text="hi")]
    )


async def outcome(channel: grpc.aio.Channel, user: str) -> str:
    events = [e async for e in chat_pb2_grpc.ChatServiceStub(channel).Complete(request(user), timeout=10)]
    return pb.Outcome.Name(events[-1].finished.outcome)


def prestop(pid: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatgate_server", "prestop", "--pid", str(pid), "--wait-seconds", "0.2"],
        capture_output=True,
        text=True,
        timeout=20,
    )


async def statuses(target: str) -> list[int | None]:
    return [await health_status(target, name) for name in ("", CHAT_SERVICE, LEDGER_HEALTH_SERVICE)]


@pytest.fixture
async def mtls_replica(
    migrated_database_url: str, simulator: Simulator, tmp_path: Path
) -> AsyncIterator[tuple[Replica, grpc.ChannelCredentials]]:
    ca = Authority()
    cert, key = ca.issue("chatgate", server=True).write(tmp_path, "server")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    client = ca.issue("billing-api")
    replica = Replica(
        "mtls",
        tmp_path,
        {
            "OPENAI_BASE_URL": simulator.base_url,
            "DATABASE_URL": migrated_database_url,
            "CHATGATE_TLS_CERT_FILE": str(cert),
            "CHATGATE_TLS_KEY_FILE": str(key),
            "CHATGATE_TLS_CLIENT_CA_FILE": str(tmp_path / "ca.crt"),
            "CHATGATE_HEALTH_LISTEN": f"127.0.0.1:{free_port()}",
        },
    )
    credentials = grpc.ssl_channel_credentials(ca.pem, client.key_pem, client.cert_pem)
    try:
        await replica.start()
        yield replica, credentials
    finally:
        await replica.stop()


async def test_the_health_port_is_plaintext_health_only_and_prestop_sticks_while_calls_go_on(
    mtls_replica: tuple[Replica, grpc.ChannelCredentials],
) -> None:
    replica, credentials = mtls_replica
    # Plaintext, no certificate: health answers; nothing else is served there.
    assert await statuses(replica.health_target) == [SERVING, SERVING, SERVING]
    async with grpc.aio.insecure_channel(replica.health_target) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await outcome(plain, "u-plain")
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED

    done = await asyncio.to_thread(prestop, replica.pid)
    assert done.returncode == 0, done.stderr
    assert await statuses(replica.health_target) == [NOT_SERVING] * 3
    await asyncio.sleep(1)  # the ledger's health listener runs on: it must not undo it
    assert await statuses(replica.health_target) == [NOT_SERVING] * 3
    assert "prestop" in replica.log_text()

    # Calls are still served (over mTLS on the main port) until SIGTERM.
    async with grpc.aio.secure_channel(replica.target, credentials) as channel:
        assert [await outcome(channel, f"u{i}") for i in range(3)] == ["OUTCOME_COMPLETED"] * 3
        # While SIGTERM drains a running stream, the main port takes no new connection
        # and the health port still answers, NOT_SERVING.
        stream = chat_pb2_grpc.ChatServiceStub(channel).Complete(
            pb.CompleteRequest(
                model="gpt-4o-mini::chunks=10,delay_ms=100",
                user_id="u-draining",
                messages=[pb.Message(role=pb.ROLE_USER, text="hi")],
            ),
            timeout=10,
        )
        first = await stream.read()
        assert isinstance(first, pb.CompleteResponse) and first.WhichOneof("event") == "started"
        replica.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert await statuses(replica.health_target) == [NOT_SERVING] * 3
        events = []
        while isinstance(event := await stream.read(), pb.CompleteResponse):
            events.append(event)
        assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
    assert await replica.exit_code() == 0, replica.log_tail()


async def test_prestop_reaches_every_worker_of_a_supervisor(
    migrated_database_url: str, simulator: Simulator, tmp_path: Path
) -> None:
    health_port = free_port()
    replica = Replica(
        "workers",
        tmp_path,
        {
            "OPENAI_BASE_URL": simulator.base_url,
            "DATABASE_URL": migrated_database_url,
            "CHATGATE_HEALTH_LISTEN": f"127.0.0.1:{health_port}",
        },
        workers=2,
    )
    try:
        await replica.start()
        done = await asyncio.to_thread(prestop, replica.pid)
        assert done.returncode == 0, done.stderr
        await asyncio.sleep(0.5)
        # Each fresh connection lands on either worker (SO_REUSEPORT): all say NOT_SERVING,
        # on the health port and on the main one, and both still serve calls.
        answers = [await health_status(t) for t in [replica.health_target, replica.target] * 6]
        assert answers == [NOT_SERVING] * 12
        async with grpc.aio.insecure_channel(replica.target) as channel:
            assert await outcome(channel, "u-after-prestop") == "OUTCOME_COMPLETED"
        replica.signal(signal.SIGTERM)
        assert await replica.exit_code() == 0, replica.log_tail()
    finally:
        await replica.stop()
