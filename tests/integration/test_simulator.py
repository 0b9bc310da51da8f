"""The simulator over real sockets: stream shape, tools, HTTP plumbing, stats, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from chatgate_server.simulator import Simulator
from chatgate_server.simulator.content import text_of
from chatgate_server.simulator.testing import DONE, content_of, sse_chunks, sse_data, tool_calls_of

KEY = "sk-test-secret-0123456789"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "units": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "units"],
        },
    },
}
STOCK_TOOL = {
    "type": "function",
    "function": {
        "name": "get_stock_price",
        "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}}},
    },
}


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


def chat(
    model: str = "gpt-4o-mini", *, stream: bool = True, usage: bool = True, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "stream": stream, **extra}
    if stream and usage:
        body["stream_options"] = {"include_usage": True}
    return body


async def test_stream_has_the_recorded_shape(sim: Simulator, client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat())

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.headers["x-request-id"].startswith("req_")
    data = sse_data(response.text)
    assert data[-1] == DONE
    chunks = sse_chunks(response.text)  # every other payload is valid JSON
    assert len(chunks) == 1 + 12 + 1 + 1  # role, content, finish, usage
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert chunks[0]["id"].startswith("chatcmpl-sim-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "gpt-4o-mini-2024-07-18"
        assert isinstance(chunk["created"], int)
        assert chunk["system_fingerprint"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" not in c for c in chunks[1:13])
    assert chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    text = content_of(chunks)
    assert text == text_of(12)
    assert text.startswith("The quick brown fox jumps over the lazy dog")
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == 12
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0

    [record] = sim.requests
    assert record.completed and not record.closed_early and record.closed_at is None
    assert record.status == 200
    assert record.content_chunks_sent == 12
    assert record.had_auth
    assert record.attempt == 1
    assert record.model == "gpt-4o-mini"
    assert record.body["messages"] == MESSAGES
    assert "authorization" not in record.headers
    assert sim.open_streams == 0


async def test_without_include_usage_there_is_no_usage_chunk(client: httpx.AsyncClient) -> None:
    for body in (chat(usage=False), chat(usage=False, stream_options={"include_usage": False})):
        response = await client.post("/chat/completions", json=body)
        chunks = sse_chunks(response.text)
        assert all(c["choices"] for c in chunks)
        assert all(c.get("usage") is None for c in chunks)
        assert sse_data(response.text)[-1] == DONE


async def test_model_suffix_and_header_select_a_scenario(sim: Simulator, client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat("gpt-4o::chunks=3"))
    chunks = sse_chunks(response.text)
    assert content_of(chunks) == "The quick brown"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[0]["model"] == "gpt-4o-2024-08-06"

    response = await client.post(
        "/chat/completions", json=chat("o3-mini"), headers={"x-simulator-scenario": "chunks=70"}
    )
    chunks = sse_chunks(response.text)
    assert chunks[0]["model"] == "o3-mini"  # no snapshot alias: reported as asked
    assert content_of(chunks) == text_of(70)  # wraps round the word list
    assert chunks[-1]["usage"]["completion_tokens"] == 70

    assert [r.model for r in sim.requests] == ["gpt-4o", "o3-mini"]
    assert sim.requests[0].spec.chunks == 3
    assert sim.requests[1].spec.text == "chunks=70"


async def test_path_without_v1_prefix(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.root_url, headers={"authorization": "Bearer x"}) as http:
        response = await http.post("/chat/completions", json=chat())
    assert response.status_code == 200
    assert sse_data(response.text)[-1] == DONE


async def test_delay_spreads_chunks_over_time(client: httpx.AsyncClient) -> None:
    arrivals: list[float] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    body = chat("gpt-4o-mini::chunks=4,delay_ms=40", usage=False)
    async with client.stream("POST", "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                arrivals.append(loop.time() - start)
    assert len(arrivals) == 4
    assert arrivals[-1] - arrivals[0] >= 0.1  # three 40 ms gaps between four chunks


async def test_a_busy_simulator_keeps_its_pace_by_sending_what_fell_due_together(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    # Paced chunks follow a schedule: when the process was busy (here: blocked), the
    # chunks that fell due meanwhile go out at once, as a real upstream that keeps its
    # own pace would have sent them, instead of each waiting its delay after the last.
    body = chat("gpt-4o-mini::chunks=20,delay_ms=30", usage=False)
    async with client.stream("POST", "/chat/completions", json=body) as response:
        lines = response.aiter_lines()
        async for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break  # the first chunk is here
        record = sim.requests[-1]
        before = record.content_chunks_sent
        time.sleep(0.2)  # noqa: ASYNC251 - blocking on purpose: ~6 delays fall due meanwhile
        for _ in range(1000):  # loop turns until the simulator's overdue timer has run
            if record.content_chunks_sent != before:
                break
            await asyncio.sleep(0)
        assert record.content_chunks_sent - before >= 5  # in one go, not one per delay
        async for _ in lines:
            pass
    assert record.content_chunks_sent == 20


async def test_max_completion_tokens_cuts_with_length(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat(max_completion_tokens=3))
    chunks = sse_chunks(response.text)
    assert content_of(chunks) == "The quick brown"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_non_streaming_completion(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat(stream=False))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini-2024-07-18"
    assert body["choices"][0]["message"]["content"] == text_of(12)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 12


async def test_tool_call_arguments_concatenate_to_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat(tools=[WEATHER_TOOL, STOCK_TOOL]))
    chunks = sse_chunks(response.text)
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    [head] = first["tool_calls"]
    assert head["index"] == 0 and head["type"] == "function"
    assert head["id"].startswith("call_")
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    calls = tool_calls_of(chunks)
    assert list(calls) == [0]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "units": "c"}
    fragments = [c for c in chunks[1:-2] if c["choices"][0]["delta"].get("tool_calls")]
    assert len(fragments) >= 3  # split in pieces
    assert all(set(c["choices"][0]["delta"]["tool_calls"][0]) == {"index", "function"} for c in fragments)
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert content_of(chunks) == ""
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_tool_choice_none_and_named(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat(tools=[WEATHER_TOOL], tool_choice="none"))
    assert content_of(sse_chunks(response.text)) == text_of(12)

    named = {"type": "function", "function": {"name": "get_stock_price"}}
    body = chat("gpt-4o::parallel_tools", tools=[WEATHER_TOOL, STOCK_TOOL], tool_choice=named)
    calls = tool_calls_of(sse_chunks((await client.post("/chat/completions", json=body)).text))
    assert [c.name for c in calls.values()] == ["get_stock_price"]
    assert json.loads(calls[0].arguments) == {"ticker": "Paris"}


async def test_parallel_tool_calls(client: httpx.AsyncClient) -> None:
    body = chat("gpt-4o::parallel_tools", tools=[WEATHER_TOOL, STOCK_TOOL])
    response = await client.post("/chat/completions", json=body)
    chunks = sse_chunks(response.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    calls = tool_calls_of(chunks)
    assert sorted(calls) == [0, 1]
    assert calls[0].name == "get_weather" and calls[1].name == "get_stock_price"
    assert calls[0].call_id != calls[1].call_id
    assert json.loads(calls[0].arguments) == {"city": "Paris", "units": "c"}
    assert json.loads(calls[1].arguments) == {"ticker": "Paris"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"

    body["parallel_tool_calls"] = False
    calls = tool_calls_of(sse_chunks((await client.post("/chat/completions", json=body)).text))
    assert list(calls) == [0]


async def test_refusal(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat("gpt-4o::refusal", tools=[WEATHER_TOOL]))
    chunks = sse_chunks(response.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None, "refusal": ""}
    assert content_of(chunks, "refusal") == "I'm sorry, I can't assist with that request."
    assert content_of(chunks) == ""
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_missing_or_empty_key_is_401(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        for headers in ({}, {"authorization": "Bearer"}, {"authorization": "Basic abc"}):
            response = await http.post("/chat/completions", json=chat(), headers=headers)
            assert response.status_code == 401
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
            assert "API key" in error["message"]
    assert [r.had_auth for r in sim.requests] == [False, False, False]
    assert all(r.status == 401 for r in sim.requests)


async def test_bad_requests_are_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "parse the JSON body" in response.json()["error"]["message"]

    response = await client.post("/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 400

    response = await client.post("/chat/completions", json=chat("gpt-4o::sttaus=500"))
    assert response.status_code == 400
    assert "sttaus" in response.json()["error"]["message"]


async def test_health_stats_reset_and_unknown_path(sim: Simulator, client: httpx.AsyncClient) -> None:
    await client.post("/chat/completions", json=chat("gpt-4o::chunks=2"))
    await client.post("/chat/completions", json=chat("gpt-4o::status=500"))

    async with httpx.AsyncClient(base_url=sim.root_url) as http:
        assert (await http.get("/health")).status_code == 200
        raw = (await http.get("/_simulator/stats")).text
        stats = orjson.loads(raw)
        assert KEY not in raw
        assert "authorization" not in raw
        assert stats["open_streams"] == 0
        assert stats["counters"]["requests"] == 2
        assert stats["counters"]["completed"] == 2
        assert stats["statuses"] == {"200": 1, "500": 1}
        first, second = stats["requests"]
        assert first["model"] == "gpt-4o" and first["content_chunks_sent"] == 2
        assert first["had_auth"] is True and first["completed"] is True
        assert first["spec"]["chunks"] == 2
        assert second["status"] == 500

        assert (await http.post("/_simulator/reset")).status_code == 200
        stats = (await http.get("/_simulator/stats")).json()
        assert stats["requests"] == [] and stats["counters"]["requests"] == 0
        assert sim.requests == []

        response = await http.post("/v1/embeddings", json={})
        assert response.status_code == 404
        assert response.json()["error"]["message"] == "Invalid URL (POST /v1/embeddings)"


async def test_keep_alive_and_connection_close(sim: Simulator) -> None:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(
        base_url=sim.base_url, headers={"authorization": "Bearer x"}, limits=limits
    ) as http:
        for _ in range(5):
            response = await http.post("/chat/completions", json=chat())
            assert response.headers["connection"] == "keep-alive"
            assert sse_data(response.text)[-1] == DONE
        response = await http.post(
            "/chat/completions", json=chat(stream=False), headers={"connection": "close"}
        )
        assert response.headers["connection"] == "close"
        assert response.json()["object"] == "chat.completion"
    assert len(sim.requests) == 6


async def test_pipelined_requests_and_malformed_request_line(sim: Simulator) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\nGET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.count(b"HTTP/1.1 200 OK") == 2

    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(b"garbage\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400 ")


async def test_many_concurrent_streams(sim: Simulator, client: httpx.AsyncClient) -> None:
    bodies = [chat(f"gpt-4o-mini::chunks={n}") for n in range(1, 41)]
    responses = await asyncio.gather(*(client.post("/chat/completions", json=b) for b in bodies))
    for n, response in enumerate(responses, start=1):
        assert sse_chunks(response.text)[-1]["usage"]["completion_tokens"] == n
    assert sim.counters["completed"] == 40


async def test_cli_runs_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatgate_server.simulator",
        "--port",
        "0",
        "--chunks",
        "5",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        url = line.split()[-1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        async with httpx.AsyncClient(base_url=url, headers={"authorization": "Bearer x"}) as http:
            response = await http.post("/chat/completions", json=chat())
            assert sse_chunks(response.text)[-1]["usage"]["completion_tokens"] == 5
            stats = (await http.get(url.removesuffix("/v1") + "/_simulator/stats")).json()
            assert stats["counters"]["requests"] == 1
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
