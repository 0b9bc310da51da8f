"""The soak's world: a fresh database, the simulator, chatgate, and what watches them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.procs import free_port
from bench.procstat import sample

# /proc/net/tcp states (include/net/tcp_states.h).
TCP_STATES = {
    "01": "ESTABLISHED",
    "08": "CLOSE_WAIT",
    "06": "TIME_WAIT",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
}


def chatgate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "chatgate_server", *args]


def migrate(database_url: str) -> None:
    subprocess.run(
        chatgate_command("migrate"),
        env={**os.environ, "DATABASE_URL": database_url},
        check=True,
        capture_output=True,
        timeout=120,
    )


class Simulator:
    """``chatgate simulator`` in its own process, as an operator would run it."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self._log = log.open("ab")
        self._popen = subprocess.Popen(
            chatgate_command("simulator", "--port", str(self.port)),
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        assert self._popen.stdout is not None
        line = self._popen.stdout.readline().decode()
        if "listening" not in line:
            raise RuntimeError(f"the simulator did not start: {line!r}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self._popen.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(10)
        if self._popen.poll() is None:
            self._popen.kill()
            self._popen.wait()
        self._log.close()


@dataclass
class Chatgate:
    """``chatgate serve`` (one worker), started again on the same port and spool."""

    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        env = {**self.env, "CHATGATE_LISTEN": self.target}
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                chatgate_command("serve", "--workers", "1"), env=env, stdout=log, stderr=log
            )
        self.starts += 1

    async def wait_serving(self, within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        while not await health_check(self.target, 1.0):
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"chatgate exited with {self.popen.returncode}; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"chatgate did not serve within {within_s} s; see {self.log}")
            await asyncio.sleep(0.1)

    async def terminate(self, within_s: float = 60.0) -> int:
        """SIGTERM and wait: the graceful path (drain, flush the ledger)."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.popen.wait, within_s)

    async def kill(self) -> None:
        assert self.popen is not None
        self.popen.kill()
        await asyncio.to_thread(self.popen.wait, 30)


async def health_check(target: str, within_s: float) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=within_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class HealthProbe:
    """Health Check every ``interval_s`` on one channel: latencies while chatgate is up.

    ``paused`` is set around the planned restarts, whose refusals say nothing about
    chatgate's health under load."""

    target: str
    interval_s: float = 0.2
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    paused: bool = False

    async def run(self, stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                if not self.paused:
                    await self._probe(stub)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval_s)

    async def _probe(self, stub: health_pb2_grpc.HealthStub) -> None:
        started = time.perf_counter()
        try:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            if not self.paused:
                self.failures.append(exc.code().name)
            return
        self.latencies_ms.append((time.perf_counter() - started) * 1000)


@dataclass
class MemoryWatch:
    """RSS of chatgate's process tree, once a second: the first, highest and last reading."""

    chatgate: Chatgate
    readings_mb: list[float] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.chatgate.popen is not None and self.chatgate.popen.poll() is None:
                self.readings_mb.append(sample([self.chatgate.pid]).rss_kb / 1024)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


def upstream_connections(upstream_port: int) -> dict[str, int]:
    """chatgate's sockets to the upstream by TCP state (the simulator is its only peer there)."""
    counts: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                remote_port = int(parts[2].rsplit(":", 1)[1], 16)
                if remote_port == upstream_port:
                    state = TCP_STATES.get(parts[3], parts[3])
                    counts[state] = counts.get(state, 0) + 1
    return counts
