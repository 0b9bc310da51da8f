"""The simulator's fault scenarios over real sockets: errors, retries, broken streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from chatgate_server.simulator import Simulator
from chatgate_server.simulator.testing import DONE, content_of, sse_chunks, sse_data

KEY = "sk-test-secret-fault-42"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator()
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=sim.base_url, headers={"authorization": f"Bearer {KEY}"}, timeout=5
    ) as http:
        yield http


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


EXPECTED_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("request_forbidden", None),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout", None),
    409: ("invalid_request_error", None),
    422: ("invalid_request_error", None),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", None),
}


@pytest.mark.parametrize("status", sorted(EXPECTED_ERRORS))
async def test_status_scenarios(sim: Simulator, client: httpx.AsyncClient, status: int) -> None:
    response = await client.post("/chat/completions", json=chat(f"gpt-4o::status={status}"))

    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    type_, code = EXPECTED_ERRORS[status]
    assert error["type"] == type_
    if code is not None:
        assert error["code"] == code
    assert KEY not in response.text
    if status == 404:
        assert "gpt-4o" in error["message"]
    if status == 503:
        assert error["message"] == "Slow Down"
    [record] = sim.requests
    assert record.status == status and record.completed and record.content_chunks_sent == 0


async def test_times_fails_the_first_attempts_per_client_request_id(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    body = chat("gpt-4o-mini::status=500,times=2")
    statuses = []
    for _ in range(3):
        response = await client.post("/chat/completions", json=body, headers={"x-client-request-id": "req-a"})
        statuses.append(response.status_code)
    assert statuses == [500, 500, 200]
    assert sse_data(response.text)[-1] == DONE
    # Another logical request starts failing afresh.
    other = await client.post("/chat/completions", json=body, headers={"x-client-request-id": "req-b"})
    assert other.status_code == 500
    assert [r.attempt for r in sim.requests] == [1, 2, 3, 1]
    assert [r.headers["x-client-request-id"] for r in sim.requests] == ["req-a"] * 3 + ["req-b"]


async def test_times_without_client_id_is_keyed_by_spec(client: httpx.AsyncClient) -> None:
    statuses = []
    for _ in range(3):
        response = await client.post("/chat/completions", json=chat("gpt-4o::status=503,times=1"))
        statuses.append(response.status_code)
    assert statuses == [503, 200, 200]


async def test_rate_limit(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat("gpt-4o::rate_limit"))
    assert response.status_code == 429
    assert response.headers["retry-after-ms"] == "100"
    assert "retry-after" not in response.headers
    for name in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{name}-requests" in response.headers
        assert f"x-ratelimit-{name}-tokens" in response.headers
    error = response.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "Rate limit reached" in error["message"]
    assert "Please try again in 100ms." in error["message"]

    response = await client.post("/chat/completions", json=chat("gpt-4o::rate_limit,retry_after_ms=644"))
    assert response.headers["retry-after-ms"] == "644"
    assert "Please try again in 644ms." in response.json()["error"]["message"]

    response = await client.post("/chat/completions", json=chat("gpt-4o::rate_limit,retry_after=2"))
    assert response.headers["retry-after"] == "2"
    assert "retry-after-ms" not in response.headers
    assert "Please try again in 2s." in response.json()["error"]["message"]

    response = await client.post("/chat/completions", json=chat("gpt-4o::rate_limit,no_retry_after"))
    assert "retry-after" not in response.headers and "retry-after-ms" not in response.headers


async def test_rate_limit_honours_times(client: httpx.AsyncClient) -> None:
    headers = {"x-client-request-id": "rl-1"}
    body = chat("gpt-4o::rate_limit,times=1")
    first = await client.post("/chat/completions", json=body, headers=headers)
    second = await client.post("/chat/completions", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (429, 200)


async def test_insufficient_quota_and_too_large(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat("gpt-4o::insufficient_quota"))
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
    assert "retry-after-ms" not in response.headers

    response = await client.post("/chat/completions", json=chat("gpt-4o::too_large"))
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"].startswith("Request too large for gpt-4o")
    assert "Limit 30000, Requested 45000" in error["message"]


async def test_should_retry_header(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat("gpt-4o::status=500,should_retry=false"))
    assert response.headers["x-should-retry"] == "false"
    response = await client.post("/chat/completions", json=chat("gpt-4o::rate_limit,should_retry=true"))
    assert response.headers["x-should-retry"] == "true"
    response = await client.post("/chat/completions", json=chat("gpt-4o::status=500"))
    assert "x-should-retry" not in response.headers


async def test_hang_then_client_gives_up(sim: Simulator) -> None:
    async with httpx.AsyncClient(
        base_url=sim.base_url, headers={"authorization": "Bearer x"}, timeout=httpx.Timeout(5, read=0.3)
    ) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/chat/completions", json=chat("gpt-4o::hang"))
        gave_up = time.monotonic()
        await sim.wait_closed(1, timeout=2)
    [record] = sim.requests
    assert record.status is None
    assert record.closed_early and not record.completed
    assert record.closed_at is not None and record.closed_at - gave_up < 0.5
    assert sim.open_streams == 0


async def test_hang_is_open_until_closed(sim: Simulator, client: httpx.AsyncClient) -> None:
    task = asyncio.create_task(client.post("/chat/completions", json=chat("gpt-4o::hang")))
    await sim.wait_requests(1)
    await asyncio.sleep(0.05)
    assert sim.open_streams == 1
    task.cancel()  # httpx closes the connection
    with pytest.raises(asyncio.CancelledError):
        await task
    await sim.wait_idle(timeout=2)
    assert sim.requests[0].closed_early


async def test_stall_then_client_closes(sim: Simulator, client: httpx.AsyncClient) -> None:
    seen = 0
    async with client.stream("POST", "/chat/completions", json=chat("gpt-4o::stall_after=3")) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if '"content":"' in line and '"content":""' not in line:
                seen += 1
                if seen == 3:
                    break
        assert sim.open_streams == 1
        await asyncio.sleep(0.05)
        assert sim.requests[0].content_chunks_sent == 3  # nothing more while stalled
    closed = time.monotonic()  # leaving the block closes the unfinished response
    await sim.wait_closed(1, timeout=2)

    [record] = sim.requests
    assert record.closed_early and not record.completed and not record.aborted
    assert record.status == 200
    assert record.content_chunks_sent == 3
    assert record.closed_at is not None and record.closed_at - closed < 0.5
    assert sim.open_streams == 0


async def test_early_close_during_delay_stops_the_stream(sim: Simulator, client: httpx.AsyncClient) -> None:
    body = chat("gpt-4o::chunks=200,delay_ms=20")
    async with client.stream("POST", "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if '"content":"The"' in line:
                break
    await sim.wait_closed(1, timeout=2)
    sent = sim.requests[0].content_chunks_sent
    await asyncio.sleep(0.1)
    assert sim.requests[0].content_chunks_sent == sent < 200
    assert sim.requests[0].closed_early


async def test_disconnect_after(sim: Simulator, client: httpx.AsyncClient) -> None:
    seen: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream(
            "POST", "/chat/completions", json=chat("gpt-4o::disconnect_after=2")
        ) as response:
            async for line in response.aiter_lines():
                seen.append(line)
    assert content_of(sse_chunks("\n".join(seen))) == "The quick"
    await sim.wait_closed(1)
    [record] = sim.requests
    assert record.aborted and not record.completed and not record.closed_early
    assert record.content_chunks_sent == 2
    assert sim.open_streams == 0


async def test_disconnect_after_with_delay(sim: Simulator, client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/chat/completions", json=chat("gpt-4o::disconnect_after=3,delay_ms=5"))
    await sim.wait_closed(1)
    assert sim.requests[0].aborted and sim.requests[0].content_chunks_sent == 3


async def test_error_event_after(sim: Simulator, client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat("gpt-4o::error_event_after=2"))
    assert response.status_code == 200
    data = sse_data(response.text)
    assert DONE not in data
    chunks = sse_chunks(response.text)
    assert content_of(chunks) == "The quick"
    assert chunks[-1] == {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert sim.requests[0].completed


async def test_malformed_after(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat("gpt-4o::malformed_after=1,chunks=3"))
    data = sse_data(response.text)
    assert data[2] == "{not json"
    assert data[-1] == DONE
    with pytest.raises(ValueError):
        sse_chunks(response.text)


async def test_no_done_and_no_usage(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat("gpt-4o::no_done"))
    data = sse_data(response.text)
    assert DONE not in data
    assert sse_chunks(response.text)[-1]["usage"]["completion_tokens"] == 12

    response = await client.post("/chat/completions", json=chat("gpt-4o::no_usage"))
    chunks = sse_chunks(response.text)
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert sse_data(response.text)[-1] == DONE


async def test_headers_delay(client: httpx.AsyncClient) -> None:
    start = time.monotonic()
    response = await client.post("/chat/completions", json=chat("gpt-4o::headers_delay_ms=150"))
    assert response.status_code == 200
    assert time.monotonic() - start >= 0.14


async def test_faults_pass_after_times(client: httpx.AsyncClient) -> None:
    headers = {"x-client-request-id": "stall-once"}
    body = chat("gpt-4o::stall_after=1,times=1")
    async with client.stream("POST", "/chat/completions", json=body, headers=headers) as response:
        async for line in response.aiter_lines():
            if '"content":"The"' in line:
                break
    response = await client.post("/chat/completions", json=body, headers=headers)
    assert sse_data(response.text)[-1] == DONE


async def test_stop_cuts_streams_in_flight() -> None:
    simulator = Simulator()
    await simulator.start()
    async with httpx.AsyncClient(base_url=simulator.base_url, headers={"authorization": "Bearer x"}) as http:
        task = asyncio.create_task(http.post("/chat/completions", json=chat("gpt-4o::stall_after=1")))
        await simulator.wait_requests(1)
        await simulator.stop()
        with pytest.raises(httpx.HTTPError):
            await task
    [record] = simulator.requests
    assert record.aborted and not record.closed_early
    assert simulator.open_streams == 0
