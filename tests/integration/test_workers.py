"""``chatgate serve --workers N``: N processes on one port, stopped together, failing together."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import grpc
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


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(c) for c in text)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def start(
    database_url: str, base_url: str, port: int, *args: str, stderr: IO[bytes] | None = None
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": base_url,
        "DATABASE_URL": database_url,
        "CHATGATE_AUTH": "off",  # these tests are about processes, not callers
        "CHATGATE_LISTEN": f"127.0.0.1:{port}",
        "CHATGATE_SHUTDOWN_GRACE_SECONDS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "chatgate_server", "serve", *args],
        env=env,
        # A file, not a pipe: nobody reads a pipe while the test runs, and workers that
        # block writing logs to a full pipe cannot shut down.
        stderr=stderr or tempfile.TemporaryFile(),
        text=True,
    )


def wait_serving(proc: subprocess.Popen[str], target: str, workers: int) -> None:
    deadline = time.monotonic() + 30
    while not (serving(target) and len(children(proc.pid)) == workers):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "chatgate did not start its workers"
        time.sleep(0.1)


def complete(target: str, n: int) -> list[str]:
    """``n`` calls, each on its own channel (so its own connection, spread by the kernel)."""
    outcomes = []
    for i in range(n):
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            request = pb.CompleteRequest(
                model="gpt-4o-mini::chunks=3",
                user_id=f"u{i}",
                messages=[pb.Message(role=pb.ROLE_USER, text="hi")],
            )
            events = list(stub.Complete(request, timeout=10))
            outcomes.append(pb.Outcome.Name(events[-1].finished.outcome))
    return outcomes


# The tests are async although they block: the in-process simulator needs the event
# loop to keep running, so the blocking parts go to a thread.


async def test_two_workers_share_the_port_and_stop_together(
    migrated_database_url: str, simulator: Simulator
) -> None:
    port = free_port()
    proc = start(migrated_database_url, simulator.base_url, port, "--workers", "2")
    try:
        target = f"127.0.0.1:{port}"
        await asyncio.to_thread(wait_serving, proc, target, 2)
        workers = children(proc.pid)
        assert await asyncio.to_thread(complete, target, 6) == ["OUTCOME_COMPLETED"] * 6
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert not any(alive(pid) for pid in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_worker_that_dies_takes_the_others_down(
    migrated_database_url: str, simulator: Simulator
) -> None:
    port = free_port()
    proc = start(migrated_database_url, simulator.base_url, port, "--workers", "2")
    try:
        await asyncio.to_thread(wait_serving, proc, f"127.0.0.1:{port}", 2)
        first, second = children(proc.pid)
        os.kill(first, signal.SIGKILL)
        # Exits non-zero so that what runs chatgate restarts it, and leaves no worker behind.
        assert await asyncio.to_thread(proc.wait, 20) != 0
        assert await asyncio.to_thread(gone, second, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--workers", "2"], {"CHATGATE_LISTEN": "127.0.0.1:0"}, "CHATGATE_LISTEN"),
        ([], {"CHATGATE_LISTEN": "127.0.0.1:0", "CHATGATE_WORKERS": "2"}, "CHATGATE_LISTEN"),
        ([], {"CHATGATE_WORKERS": "many"}, "CHATGATE_WORKERS"),
        (["--workers", "0"], {}, "--workers"),
    ],
)
def test_bad_worker_counts_are_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHATGATE_", "DATABASE_URL"))}
    result = subprocess.run(
        [sys.executable, "-m", "chatgate_server", "serve", *args],
        env={**base, "OPENAI_API_KEY": TEST_API_KEY, "DATABASE_URL": "postgresql://127.0.0.1:1/none", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def refused(proc: subprocess.Popen[str], log: IO[bytes]) -> str:
    """Wait for ``proc`` to exit non-zero; return what it wrote to ``log``."""
    code = proc.wait(60)
    log.seek(0)
    stderr = log.read().decode()
    assert code != 0, stderr
    return stderr


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_a_second_server_on_a_port_in_use_refuses_to_start(
    migrated_database_url: str, simulator: Simulator
) -> None:
    # SO_REUSEPORT let it start and take a share of the calls (issue 13, item 13).
    port = free_port()
    target = f"127.0.0.1:{port}"
    first = start(migrated_database_url, simulator.base_url, port, "--workers", "1")
    try:
        await asyncio.to_thread(wait_serving, first, target, 0)
        for workers in ("1", "2"):  # a single server, and a supervisor
            with tempfile.TemporaryFile() as log:
                url = simulator.base_url
                second = start(migrated_database_url, url, port, "--workers", workers, stderr=log)
                assert "address already in use" in (await asyncio.to_thread(refused, second, log)).lower()
        assert first.poll() is None
        assert await asyncio.to_thread(complete, target, 3) == ["OUTCOME_COMPLETED"] * 3
    finally:
        await asyncio.to_thread(stop, first)


async def test_a_server_cannot_join_a_supervisors_port(
    migrated_database_url: str, simulator: Simulator
) -> None:
    port = free_port()
    supervisor = start(migrated_database_url, simulator.base_url, port, "--workers", "2")
    try:
        await asyncio.to_thread(wait_serving, supervisor, f"127.0.0.1:{port}", 2)
        with tempfile.TemporaryFile() as log:
            single = start(migrated_database_url, simulator.base_url, port, "--workers", "1", stderr=log)
            assert "address already in use" in (await asyncio.to_thread(refused, single, log)).lower()
        assert supervisor.poll() is None
    finally:
        await asyncio.to_thread(stop, supervisor)
