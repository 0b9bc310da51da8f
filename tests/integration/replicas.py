"""``chatgate serve`` processes for the multi-replica tests: started, signalled, killed,
restarted with the same port and spool, as a process manager (or Kubernetes) would."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import TEST_API_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def health_status(target: str, service: str = "", timeout: float = 2) -> int | None:
    """The health status of ``service`` at ``target``, or None when nothing answers."""
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return None
    return int(reply.status)


class Replica:
    """One ``chatgate serve`` process on a fixed port with its own spool directory."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str], *, workers: int = 1) -> None:
        self.name = name
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.spool_dir = workdir / f"{name}-spool"
        self.log_path = workdir / f"{name}.log"
        self.health_target = self.target
        self._workers = workers
        self._env = {
            **os.environ,
            "OPENAI_API_KEY": TEST_API_KEY,
            "CHATGATE_AUTH": "off",  # these tests are about processes, not callers
            "CHATGATE_LISTEN": self.target,
            "CHATGATE_SPOOL_DIR": str(self.spool_dir),
            "CHATGATE_SHUTDOWN_GRACE_SECONDS": "5",
            **env,
        }
        if "CHATGATE_HEALTH_LISTEN" in env:
            self.health_target = env["CHATGATE_HEALTH_LISTEN"]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30) -> None:
        """Start (or restart) the process and wait until its health says SERVING."""
        await self.spawn()
        deadline = time.monotonic() + timeout
        while await health_status(self.health_target) != health_pb2.HealthCheckResponse.SERVING:
            assert self.proc is not None and self.proc.returncode is None, (
                f"{self.name} exited during start-up:\n{self.log_tail()}"
            )
            assert time.monotonic() < deadline, f"{self.name} did not become healthy:\n{self.log_tail()}"
            await asyncio.sleep(0.1)

    async def spawn(self) -> None:
        """Start (or restart) the process, without waiting for it."""
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "chatgate_server",
                "serve",
                "--workers",
                str(self._workers),
                env=self._env,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def exit_code(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self) -> None:
        """SIGKILL if still running (test clean-up)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self) -> str:
        return self.log_text()[-3000:]


class TcpBalancer:
    """Hands each new TCP connection to the next backend in turn and pins it there, as a
    Kubernetes ClusterIP Service (kube-proxy) does: a client with one long-lived HTTP/2
    connection behind it reaches one replica only, until that connection is replaced."""

    def __init__(self, ports: list[int]) -> None:
        self._ports = ports
        self._turn = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        port = self._ports[self._turn % len(self._ports)]
        self._turn += 1
        try:
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, backend_writer}
        await asyncio.gather(
            self._pump(client_reader, backend_writer), self._pump(backend_reader, client_writer)
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
