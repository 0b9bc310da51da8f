"""Deltas that arrive together go out together; deltas that come apart still stream.

Against the simulator over a real socket: its unpaced streams go out in one write, so
a whole answer lands in one read; its paced ones send each chunk on its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatgate_server.config import Secret
from chatgate_server.deadline import Deadline
from chatgate_server.domain import ChatMessage, CompletionRequest, ContentDelta, UpstreamEvent
from chatgate_server.errors import UpstreamProtocolError
from chatgate_server.simulator import Simulator
from chatgate_server.simulator.content import text_of
from chatgate_server.upstream.openai import OpenAIUpstream
from tests.integration.conftest import TEST_API_KEY


def request(model: str) -> CompletionRequest:
    return CompletionRequest(
        request_id="req-1", model=model, messages=(ChatMessage(role="user", content="hi"),), user_id="u"
    )


@pytest.fixture(params=[True, False], ids=["coalescing", "one-per-chunk"])
async def upstream(simulator: Simulator, request: pytest.FixtureRequest) -> AsyncIterator[OpenAIUpstream]:
    client = OpenAIUpstream(simulator.base_url, Secret(TEST_API_KEY), coalesce_deltas=request.param)
    try:
        yield client
    finally:
        await client.aclose()


async def read_events(upstream: OpenAIUpstream, model: str) -> tuple[list[UpstreamEvent], Exception | None]:
    req = request(model)
    stream = await upstream.open(req, Deadline.start(None, 10))
    events: list[UpstreamEvent] = []
    try:
        async for event in stream.events():
            events.append(event)
    except UpstreamProtocolError as exc:
        return events, exc
    finally:
        await stream.aclose()
    return events, None


def deltas(events: list[UpstreamEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, ContentDelta)]


async def test_a_burst_is_relayed_as_few_deltas_with_the_same_text(
    upstream: OpenAIUpstream, simulator: Simulator
) -> None:
    events, error = await read_events(upstream, "gpt-4o-mini::chunks=40")
    assert error is None
    assert simulator.requests[-1].content_chunks_sent == 40
    assert "".join(deltas(events)) == text_of(40)
    if upstream._coalesce:
        assert len(deltas(events)) < 40 / 4  # the 40 chunks came in one or a few reads
    else:
        assert len(deltas(events)) == 40


async def test_chunks_that_come_apart_still_stream_one_by_one(upstream: OpenAIUpstream) -> None:
    # 100 ms apart, each chunk is its own read: nothing is held back to merge it.
    events, error = await read_events(upstream, "gpt-4o-mini::chunks=4,delay_ms=100")
    assert error is None
    assert "".join(deltas(events)) == text_of(4)
    assert len(deltas(events)) >= 3  # (a very busy machine may merge two that fell due together)


async def test_text_before_a_malformed_event_in_the_same_read_is_not_lost(upstream: OpenAIUpstream) -> None:
    events, error = await read_events(upstream, "gpt-4o-mini::chunks=20,malformed_after=7")
    assert isinstance(error, UpstreamProtocolError)
    assert "".join(deltas(events)) == text_of(7)
