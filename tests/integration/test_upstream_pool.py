"""The upstream connection pool (upstream/pool.py) over real sockets: connections are
reused, capped, handed to waiting requests, and never leaked by a request that gives up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpcore
import pytest

from chatgate_server.simulator import Simulator
from chatgate_server.upstream.pool import UpstreamPool
from chatgate_server.upstream.transport import upstream_pool

BODY = b'{"model": "%s", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = upstream_pool(max_connections=2, keepalive_expiry=30)
    try:
        yield p
    finally:
        await p.aclose()


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop turn until ``condition`` holds (a sync point, not a guess at timing)."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - the states polled here have no event
            await asyncio.sleep(0.001)


def post(simulator: Simulator, model: str, *, pool_timeout: float = 10.0) -> httpcore.Request:
    body = BODY % model.encode()
    url = httpcore.URL(f"{simulator.base_url}/chat/completions")
    return httpcore.Request(
        "POST",
        url,
        content=body,
        headers=[
            (b"host", url.host),
            (b"authorization", b"Bearer sk-test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        extensions={"timeout": {"connect": 5, "read": 10, "write": 5, "pool": pool_timeout}},
    )


async def stream_all(pool: UpstreamPool, request: httpcore.Request) -> bytes:
    response = await pool.handle_async_request(request)
    try:
        assert response.status == 200
        return b"".join([part async for part in response.aiter_stream()])
    finally:
        await response.aclose()


async def test_streams_one_after_another_share_one_connection(
    pool: UpstreamPool, simulator: Simulator
) -> None:
    for _ in range(5):
        assert b"[DONE]" in await stream_all(pool, post(simulator, "gpt-4o-mini::chunks=3"))
    assert (pool.connections, pool.idle_connections) == (1, 1)
    assert len(simulator._connections) == 1


async def test_more_streams_than_connections_wait_their_turn_and_all_finish(
    pool: UpstreamPool, simulator: Simulator
) -> None:
    peak = 0

    async def one() -> bytes:
        nonlocal peak
        body = await stream_all(pool, post(simulator, "gpt-4o-mini::chunks=5,delay_ms=10"))
        peak = max(peak, pool.connections)
        return body

    bodies = await asyncio.gather(*(one() for _ in range(8)))
    assert all(b"[DONE]" in body for body in bodies)
    assert peak <= 2
    assert len(simulator._connections) <= 2
    assert pool.idle_connections == pool.connections <= 2


async def test_a_request_that_waits_too_long_gets_a_pool_timeout_and_leaks_nothing(
    pool: UpstreamPool, simulator: Simulator
) -> None:
    # Two streams that stall after their first chunk hold both connections.
    stalling = post(simulator, "gpt-4o-mini::stall_after=1")
    held = [await pool.handle_async_request(stalling) for _ in range(2)]
    with pytest.raises(httpcore.PoolTimeout):
        await pool.handle_async_request(post(simulator, "gpt-4o-mini", pool_timeout=0.2))
    waiter = asyncio.ensure_future(stream_all(pool, post(simulator, "gpt-4o-mini::chunks=2")))
    await until(lambda: pool.waiting == 1)
    assert not waiter.done()  # waiting for a connection
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    for response in held:
        await response.aclose()  # closed mid-body: these connections cannot be reused
    assert pool.connections == 0
    # Every slot came back: new streams get connections at once.
    bodies = await asyncio.gather(*(stream_all(pool, post(simulator, "gpt-4o-mini")) for _ in range(2)))
    assert all(b"[DONE]" in body for body in bodies)
    assert pool.connections == 2


async def test_a_waiting_request_takes_the_connection_the_moment_it_is_free(
    pool: UpstreamPool, simulator: Simulator
) -> None:
    first = [
        asyncio.ensure_future(stream_all(pool, post(simulator, "gpt-4o-mini::chunks=3,delay_ms=30")))
        for _ in range(2)
    ]
    await until(lambda: pool.connections == 2)  # both taken
    queued = asyncio.ensure_future(stream_all(pool, post(simulator, "gpt-4o-mini::chunks=2")))
    assert b"[DONE]" in await queued  # handed a connection that finished, not a third one
    await asyncio.gather(*first)
    assert pool.connections == 2
    assert len(simulator._connections) == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    served = 0

    async def one_response_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        served += 1
        # Keep-alive by the headers, then closed anyway (as servers do when idle).
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(one_response_per_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = upstream_pool(max_connections=4, keepalive_expiry=30)
    try:
        for _ in range(3):
            url = f"http://127.0.0.1:{port}/"
            headers = [(b"host", b"127.0.0.1")]
            request = httpcore.Request("GET", url, headers=headers, extensions={"timeout": {"pool": 5}})
            response = await pool.handle_async_request(request)
            assert await response.aread() == b"ok"
            await response.aclose()
            await until(lambda: pool.idle_connections == 0 or pool._idle[-1].has_expired())
        assert served == 3  # each request got a fresh connection, none failed on a dead one
        assert pool.connections <= 1
    finally:
        await pool.aclose()
        server.close()
        await server.wait_closed()
