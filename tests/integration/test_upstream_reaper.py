"""Idle upstream connections are closed without waiting for the next request (issue 13,
item 11): after load stops and the upstream closes its side, chatgate's sockets must not
sit in CLOSE-WAIT (18 did, for minutes, after the soak)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import httpcore
import pytest

from chatgate.v1 import chat_pb2_grpc
from chatgate_server.simulator import Simulator
from chatgate_server.upstream.transport import upstream_pool
from tests.integration.conftest import AppFactory
from tests.integration.test_faults import call

# States of /proc/net/tcp in which our side has not closed the socket (after we close
# it, TIME-WAIT or FIN-WAIT-2 entries linger in the kernel with no descriptor).
ESTABLISHED, CLOSE_WAIT = "01", "08"
# The reaper runs every second; a loaded machine gets several times that.
BOUND_S = 10.0


def sockets_to(port: int, states: tuple[str, ...] = (ESTABLISHED, CLOSE_WAIT)) -> int:
    """This machine's TCP sockets to remote port ``port`` in one of ``states``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] in states:
                count += 1
    return count


async def until(condition: Callable[[], bool], what: str, timeout: float = BOUND_S) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():  # noqa: ASYNC110 - sockets and pool counts have no event
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"not within {timeout:g} s without new requests: {what}")


async def test_connections_the_server_closed_are_reaped_without_new_requests() -> None:
    release = asyncio.Event()

    async def serve_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Keep-alive by the headers; the connection is closed (FIN) once load is over,
        # as servers do with idle connections.
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await release.wait()
        writer.close()

    server = await asyncio.start_server(serve_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = upstream_pool(max_connections=8, keepalive_expiry=300)

    async def one() -> None:
        request = httpcore.Request(
            "GET", f"http://127.0.0.1:{port}/", headers=[(b"host", b"127.0.0.1")], extensions={}
        )
        response = await pool.handle_async_request(request)
        assert await response.aread() == b"ok"
        await response.aclose()

    try:
        await asyncio.gather(*(one() for _ in range(5)))
        assert (pool.connections, pool.idle_connections) == (5, 5)
        release.set()  # the server closes all five; no request comes after
        await until(lambda: pool.connections == 0, f"pool still holds {pool.connections}")
        await until(lambda: sockets_to(port, (CLOSE_WAIT,)) == 0, "sockets left in CLOSE-WAIT")
    finally:
        await pool.aclose()
        server.close()
        await server.wait_closed()


async def test_chatgate_holds_no_upstream_connection_after_the_upstream_goes_away(
    start_app: AppFactory, simulator: Simulator
) -> None:
    app = await start_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        results = await asyncio.gather(*(call(stub, "gpt-4o-mini::chunks=5,delay_ms=20") for _ in range(6)))
        assert all(r.code == grpc.StatusCode.OK for r in results)
        assert app.upstream_connections == 6
        await simulator.stop()  # load is over and the upstream closes every connection
        await until(lambda: app.upstream_connections == 0, "upstream connections still open")
        await until(lambda: sockets_to(simulator.port) == 0, "sockets to the upstream left")


async def test_connections_idle_past_their_keep_alive_are_closed_without_new_requests(
    simulator: Simulator,
) -> None:
    pool = upstream_pool(max_connections=4, keepalive_expiry=0.2)
    url = f"{simulator.base_url}/models"
    try:
        request = httpcore.Request("GET", url, headers=[(b"host", b"127.0.0.1")], extensions={})
        response = await pool.handle_async_request(request)
        await response.aread()
        await response.aclose()
        assert pool.connections == 1  # the simulator keeps it open
        await until(lambda: pool.connections == 0, "a connection idle past its keep-alive is still open")
        await until(lambda: sockets_to(simulator.port) == 0, "its socket is still open")
    finally:
        await pool.aclose()
