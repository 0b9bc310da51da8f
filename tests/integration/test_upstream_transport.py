"""The upstream HTTP client against the simulator: connections are reused, and a slow
reader slows the upstream down instead of buffering its whole response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpcore
import pytest

from chatgate_server.config import Secret
from chatgate_server.deadline import Deadline
from chatgate_server.domain import ChatMessage, CompletionRequest, ContentDelta
from chatgate_server.simulator import Simulator
from chatgate_server.upstream.openai import OpenAIUpstream
from chatgate_server.upstream.pool import UpstreamPool
from chatgate_server.upstream.transport import AsyncioBackend
from tests.integration.conftest import TEST_API_KEY


def request(model: str, request_id: str = "req-1") -> CompletionRequest:
    return CompletionRequest(
        request_id=request_id,
        model=model,
        messages=(ChatMessage(role="user", content="hi"),),
        user_id="u",
    )


@pytest.fixture
async def upstream(simulator: Simulator) -> AsyncIterator[OpenAIUpstream]:
    client = OpenAIUpstream(simulator.base_url, Secret(TEST_API_KEY))
    try:
        yield client
    finally:
        await client.aclose()


async def relay_all(upstream: OpenAIUpstream, req: CompletionRequest) -> str:
    stream = await upstream.open(req, Deadline.start(None, 10))
    text = []
    try:
        async for event in stream.events():
            if isinstance(event, ContentDelta):
                text.append(event.text)
    finally:
        await stream.aclose()
    return "".join(text)


def test_the_upstream_goes_through_our_pool_on_our_backend() -> None:
    upstream = OpenAIUpstream("http://127.0.0.1:1/v1", Secret(TEST_API_KEY))
    assert isinstance(upstream._pool, UpstreamPool)
    assert isinstance(upstream._pool._backend, AsyncioBackend)


async def test_sequential_streams_reuse_one_connection(
    upstream: OpenAIUpstream, simulator: Simulator
) -> None:
    for i in range(3):
        assert await relay_all(upstream, request("gpt-4o-mini::chunks=5", f"req-{i}"))
    # Reading past [DONE] to the end of the body returns the connection to the pool.
    assert len(simulator._connections) == 1


async def test_a_slow_reader_slows_the_upstream_down(upstream: OpenAIUpstream, simulator: Simulator) -> None:
    chunks = 100_000  # ~19 MB of SSE: far more than socket buffers and our read limit hold
    # headers_delay_ms makes the simulator send chunk by chunk, pausing when TCP pushes back.
    req = request(f"gpt-4o-mini::chunks={chunks},headers_delay_ms=1")
    stream = await upstream.open(req, Deadline.start(None, 30))
    events = stream.events()
    try:
        for _ in range(10):
            await anext(events)
        await asyncio.sleep(1.0)  # plenty of time to send everything, were nothing pushing back
        sent = simulator.requests[-1].content_chunks_sent
        assert 10 <= sent < chunks // 2
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        await stream.aclose()
    await simulator.wait_idle()


async def test_transport_errors_are_httpcore_errors() -> None:
    backend = AsyncioBackend()
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("127.0.0.1", 1, timeout=2)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        stream = await backend.connect_tcp("127.0.0.1", port, timeout=2)
        assert stream.get_extra_info("is_readable") is False
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(1024, timeout=0.05)
        await stream.aclose()
    finally:
        server.close()
        await server.wait_closed()
