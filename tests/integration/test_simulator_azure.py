"""The simulator's Azure OpenAI flavor over real sockets: URLs, api-version, the api-key
header, deployments, Azure's error bodies, the filter annotations in the stream, and that
chatgate's own decoders (upstream/sse.py, upstream/chunks.py) read that stream."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from chatgate_server.domain import (
    ContentDelta,
    Finish,
    ResponseStarted,
    ToolCallDelta,
    UpstreamEvent,
    UsageReported,
)
from chatgate_server.errors import (
    UpstreamCredentialsError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
)
from chatgate_server.simulator import Simulator
from chatgate_server.simulator.content import text_of
from chatgate_server.simulator.keys import fingerprint
from chatgate_server.simulator.testing import DONE, content_of, keys_seen, sse_chunks, sse_data
from chatgate_server.upstream.chunks import ChunkDecoder
from chatgate_server.upstream.classify import classify_http_error
from chatgate_server.upstream.sse import SSEDecoder

KEY = "azure-key-0123456789abcdef"
OTHER_KEY = "azure-key-fedcba9876543210"
VERSION = "2024-10-21"
MESSAGES = [{"role": "user", "content": "Say something."}]
CATEGORIES = {"hate", "self_harm", "sexual", "violence"}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(flavor="azure", deployments={"chat": "gpt-4o-mini", "big": "gpt-4o"}) as simulator:
        yield simulator


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.azure_endpoint, headers={"api-key": KEY}, timeout=5) as http:
        yield http


def url(deployment: str = "chat", version: str | None = VERSION) -> str:
    query = f"?api-version={version}" if version is not None else ""
    return f"/openai/deployments/{deployment}/chat/completions{query}"


def chat(*, stream: bool = True, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": MESSAGES, "stream": stream, **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def decode_stream(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[UpstreamEvent]:
    """Read the raw bytes as they arrive and decode them as chatgate's adapter does."""
    sse, chunks = SSEDecoder(), ChunkDecoder()
    events: list[UpstreamEvent] = []
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        async for piece in response.aiter_raw():
            for payload in sse.feed(piece):
                events.extend(chunks.decode(payload))
    for payload in sse.flush():
        events.extend(chunks.decode(payload))
    assert chunks.done
    return events


async def test_the_stream_opens_with_the_prompt_filter_and_annotates_every_choice(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    response = await client.post(url(), json=chat())

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["apim-request-id"]
    assert int(response.headers["x-ratelimit-remaining-requests"]) > 0
    assert int(response.headers["x-ratelimit-remaining-tokens"]) > 0
    assert "x-ratelimit-limit-requests" not in response.headers  # Azure sends only what remains
    assert sse_data(response.text)[-1] == DONE
    first, *chunks = sse_chunks(response.text)
    assert first["choices"] == [] and first["id"] == "" and first["model"] == ""
    [prompt] = first["prompt_filter_results"]
    assert prompt["prompt_index"] == 0
    assert set(prompt["content_filter_results"]) == CATEGORIES | {"jailbreak"}
    role, *content, finish, usage = chunks
    assert role["choices"][0]["content_filter_results"] == {}
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for chunk in content:
        verdict = chunk["choices"][0]["content_filter_results"]
        assert set(verdict) == CATEGORIES
        assert all(v == {"filtered": False, "severity": "safe"} for v in verdict.values())
    assert content_of(content) == text_of(12)
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["choices"][0]["content_filter_results"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    assert {c["model"] for c in chunks} == {"gpt-4o-mini-2024-07-18"}  # the deployment's model

    [record] = sim.requests
    assert (record.deployment, record.api_version, record.model) == ("chat", VERSION, "gpt-4o-mini")
    assert record.auth_scheme == "api-key" and record.key_fingerprint == fingerprint(KEY)
    assert record.completed and record.status == 200


async def test_chatgates_decoders_read_the_azure_stream(client: httpx.AsyncClient) -> None:
    events = await decode_stream(client, url("big"), chat())

    started = [e for e in events if isinstance(e, ResponseStarted)]
    # The prompt-filter chunk (no id, no choices) yields nothing; the first real chunk starts.
    assert len(started) == 1
    assert started[0].response_id.startswith("chatcmpl-sim-") and started[0].model == "gpt-4o-2024-08-06"
    assert events[0] == started[0]
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == text_of(12)
    assert [e for e in events if isinstance(e, Finish)] == [Finish("stop")]
    [usage] = [e for e in events if isinstance(e, UsageReported)]
    assert usage.usage.output_tokens == 12


async def test_chatgates_decoders_read_tool_calls_and_a_filtered_answer(client: httpx.AsyncClient) -> None:
    events = await decode_stream(client, url(), chat(tools=[WEATHER_TOOL]))
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert calls[0].name == "get_weather" and calls[0].id
    assert orjson.loads("".join(c.arguments for c in calls)) == {"city": "Paris"}
    assert Finish("tool_calls") in events

    # The scenario rides on the deployment in the path, as an Azure adapter would send it.
    events = await decode_stream(client, url("chat::content_filter_after=3"), chat())
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == text_of(3)
    assert [e for e in events if isinstance(e, Finish)] == [Finish("content_filter")]
    [usage] = [e for e in events if isinstance(e, UsageReported)]
    assert usage.usage.output_tokens == 3


async def test_a_filtered_answer_flags_the_category(client: httpx.AsyncClient) -> None:
    response = await client.post(
        url(), json=chat(), headers={"x-simulator-scenario": "content_filter_after=2"}
    )
    chunks = sse_chunks(response.text)
    assert content_of(chunks) == text_of(2)
    finish = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    choice = finish["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["content_filter_results"]["violence"] == {"filtered": True, "severity": "medium"}

    response = await client.post(
        url(), json=chat(stream=False), headers={"x-simulator-scenario": "content_filter_after=2"}
    )
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["choices"][0]["message"]["content"] == text_of(2)
    assert body["choices"][0]["content_filter_results"]["violence"]["filtered"] is True


async def test_a_whole_completion_carries_the_filter_results(client: httpx.AsyncClient) -> None:
    response = await client.post(url(), json=chat(stream=False))
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == text_of(12)
    assert set(body["choices"][0]["content_filter_results"]) == CATEGORIES
    assert body["prompt_filter_results"][0]["prompt_index"] == 0


async def test_the_v1_route_takes_the_deployment_from_the_body(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    for query in ("", "?api-version=preview", "?api-version=v1"):
        response = await client.post(f"/openai/v1/chat/completions{query}", json=chat(model="big"))
        assert response.status_code == 200, response.text
        assert sse_chunks(response.text)[1]["model"] == "gpt-4o-2024-08-06"
    assert {(r.deployment, r.model) for r in sim.requests} == {("big", "gpt-4o")}

    response = await client.post("/openai/v1/chat/completions", json=chat(model="nope"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "DeploymentNotFound"
    response = await client.post("/openai/v1/chat/completions?api-version=2024-10-21", json=chat(model="big"))
    assert response.status_code == 400
    response = await client.post("/openai/v1/chat/completions", json=chat())
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "you must provide a model parameter"


async def test_api_version_missing_or_unsupported(client: httpx.AsyncClient) -> None:
    response = await client.post(url(version=None), json=chat())
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "404", "message": "Resource not found"}}

    response = await client.post(url(version="2023-11-06-preview"), json=chat())
    assert response.status_code == 400
    assert response.json() == {"error": {"code": "BadRequest", "message": "API version not supported"}}

    for version in ("2024-02-01", "2025-04-01-preview"):
        assert (await client.post(url(version=version), json=chat())).status_code == 200


async def test_unknown_deployment_and_paths(client: httpx.AsyncClient) -> None:
    response = await client.post(url("gpt-4o-mini"), json=chat())  # a model, not a deployment here
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "DeploymentNotFound"
    assert error["message"].startswith("The API deployment for this resource does not exist.")

    for path in (
        "/v1/chat/completions",
        "/openai/deployments/chat/completions",
        "/openai/deployments/chat/embeddings",
    ):
        response = await client.post(path, json=chat())
        assert response.status_code == 404
        assert response.json() == {"error": {"code": "404", "message": "Resource not found"}}


async def test_the_api_key_header_and_a_refused_bearer_token(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.azure_endpoint, timeout=5) as http:
        response = await http.post(url(), json=chat())
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "401" and error["message"].startswith(
            "Access denied due to invalid subscription key"
        )
        assert "x-ratelimit-remaining-requests" not in response.headers

        response = await http.post(url(), json=chat(), headers={"authorization": f"Bearer {KEY}"})
        assert response.status_code == 401
        body = response.json()
        assert body["statusCode"] == 401 and "error" not in body
        assert body["message"].startswith("Unauthorized. Access token is missing, invalid")

        response = await http.post(
            url(), json=chat(), headers={"authorization": f"Bearer {KEY}", "api-key": KEY}
        )
        assert response.status_code == 200

    missing, bearer, both = sim.requests
    assert not missing.had_auth and missing.auth_scheme is None and missing.key_fingerprint is None
    assert (bearer.auth_scheme, bearer.key_fingerprint, bearer.status) == ("bearer", fingerprint(KEY), 401)
    assert (both.auth_scheme, both.key_fingerprint) == ("api-key", fingerprint(KEY))


async def test_the_v1_route_takes_the_key_as_a_bearer_token_too() -> None:
    # The plain OpenAI client sends the Azure key as "Authorization: Bearer" on /openai/v1.
    sim = Simulator(flavor="azure", keys={"east": KEY})
    async with sim, httpx.AsyncClient(base_url=sim.azure_v1_base_url, timeout=5) as http:
        ok = await http.post(
            "/chat/completions", json=chat(model="gpt-4o"), headers={"authorization": f"Bearer {KEY}"}
        )
        wrong = await http.post(
            "/chat/completions", json=chat(model="gpt-4o"), headers={"authorization": f"Bearer {OTHER_KEY}"}
        )
    assert ok.status_code == 200
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "401"
    assert [(r.auth_scheme, r.key_name) for r in sim.requests] == [("bearer", "east"), ("bearer", None)]


async def test_named_keys_are_recorded_by_name_and_others_refused() -> None:
    sim = Simulator(flavor="azure", keys={"east": KEY})
    async with sim, httpx.AsyncClient(base_url=sim.azure_endpoint, timeout=5) as http:
        ok = await http.post(url("gpt-4o-mini"), json=chat(), headers={"api-key": KEY})
        refused = await http.post(url("gpt-4o-mini"), json=chat(), headers={"api-key": OTHER_KEY})
        stats = (await http.get("/_simulator/stats")).text
    assert (ok.status_code, refused.status_code) == (200, 401)
    assert refused.json()["error"]["code"] == "401"
    assert [(r.key_name, r.key_fingerprint) for r in sim.requests] == [
        ("east", fingerprint(KEY)),
        (None, fingerprint(OTHER_KEY)),
    ]
    assert keys_seen(sim.requests) == {"east", fingerprint(OTHER_KEY)}
    assert KEY not in stats and OTHER_KEY not in stats
    assert fingerprint(KEY) in stats and '"key_name":"east"' in stats


@pytest.mark.parametrize(
    ("spec", "status", "code"),
    [
        ("status=401", 401, "401"),
        ("status=404", 404, "DeploymentNotFound"),
        ("status=429", 429, "429"),
        ("rate_limit,retry_after_ms=2500", 429, "429"),
    ],
)
async def test_azure_error_bodies_by_scenario(
    client: httpx.AsyncClient, spec: str, status: int, code: str
) -> None:
    response = await client.post(url(), json=chat(), headers={"x-simulator-scenario": spec})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and set(error) == {"code", "message"}
    if status == 429:
        assert f"under Azure OpenAI API version {VERSION} have exceeded call rate limit" in error["message"]
        wait_ms = 2500 if "2500" in spec else 1000
        seconds = -(-wait_ms // 1000)
        assert f"Please retry after {seconds} seconds." in error["message"]
        assert response.headers["retry-after"] == str(seconds)
        assert response.headers["retry-after-ms"] == str(wait_ms)
        assert "x-ratelimit-remaining-requests" in response.headers


async def test_server_error_and_content_filter_bodies(client: httpx.AsyncClient) -> None:
    response = await client.post(url(), json=chat(), headers={"x-simulator-scenario": "status=500"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] is None
    assert response.headers["x-request-id"] in error["message"]  # Azure quotes the request id

    response = await client.post(url(), json=chat(), headers={"x-simulator-scenario": "content_filter"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"], error["status"]) == ("content_filter", "prompt", 400)
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert error["innererror"]["content_filter_result"]["violence"]["filtered"] is True

    response = await client.post(url(), json=chat(), headers={"x-simulator-scenario": "status=503"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "slow_down"  # passed through in OpenAI's shape


async def test_the_budget_speaks_azure(sim: Simulator, client: httpx.AsyncClient) -> None:
    sim.set_headroom(limit_requests=2, window_s=3600)
    first = await client.post(url(), json=chat())
    second = await client.post(url(), json=chat())
    third = await client.post(url(), json=chat())
    assert [r.headers["x-ratelimit-remaining-requests"] for r in (first, second)] == ["1", "0"]
    assert third.status_code == 429
    assert "exceeded call rate limit" in third.json()["error"]["message"]
    # One request refills in 3600 s / 2 = 30 min.
    assert 1790 <= int(third.headers["retry-after"]) <= 1800
    assert third.headers["retry-after-ms"].isdigit()


async def test_a_scenario_on_the_deployment_path(sim: Simulator, client: httpx.AsyncClient) -> None:
    response = await client.post(
        url("chat::status=500,times=1"), json=chat(), headers={"x-client-request-id": "r1"}
    )
    assert response.status_code == 500
    response = await client.post(
        url("chat::status=500,times=1"), json=chat(), headers={"x-client-request-id": "r1"}
    )
    assert response.status_code == 200
    assert [r.deployment for r in sim.requests] == ["chat", "chat"]


def test_bad_azure_options_are_refused() -> None:
    with pytest.raises(ValueError, match="not served"):
        Simulator(flavor="azure", deployments={"chat": "no-such-model"})
    with pytest.raises(ValueError, match="Azure options"):
        Simulator(deployments={"chat": "gpt-4o"})


async def test_the_cli_serves_azure_with_named_keys() -> None:
    env = {**os.environ, "SIM_EAST_KEY": KEY}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatgate_server.simulator",
        "--port",
        "0",
        "--flavor",
        "azure",
        "--deployment",
        "chat=gpt-4o-mini",
        "--key-env",
        "east=SIM_EAST_KEY",
        "--limit-requests",
        "5",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        endpoint = line.split()[-1]
        assert line.startswith("chatgate simulator listening on http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=endpoint, timeout=5) as http:
            ok = await http.post(url(), json=chat(), headers={"api-key": KEY})
            assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-requests"] == "4"
            assert (await http.post(url(), json=chat(), headers={"api-key": OTHER_KEY})).status_code == 401
            stats = (await http.get("/_simulator/stats")).json()
        assert [r["key_name"] for r in stats["requests"]] == ["east", None]
        assert KEY not in str(stats)
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0


async def test_the_cli_refuses_a_key_variable_that_is_not_set() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SIM_UNSET_KEY"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatgate_server.simulator",
        "--key-env",
        "east=SIM_UNSET_KEY",
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"SIM_UNSET_KEY is not set" in err


async def test_chatgates_classifier_reads_azures_error_bodies(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    async def classify(spec: str = "", **headers: str) -> Exception:
        extra = {"x-simulator-scenario": spec} if spec else {}
        response = await client.post(url(), json=chat(), headers={**extra, **headers})
        assert response.status_code >= 400
        return classify_http_error(response.status_code, response.json(), response.headers)

    limited = await classify("rate_limit,retry_after_ms=1500")
    assert isinstance(limited, UpstreamRateLimited) and limited.retry_after == 1.5

    failed = await classify("status=500")
    assert type(failed) is UpstreamError and failed.retryable

    filtered = await classify("content_filter")
    assert isinstance(filtered, UpstreamRejected) and filtered.cause == "CONTENT_POLICY"

    # Both 401 shapes (Azure's error object, and the bare statusCode body) are our key's problem.
    assert isinstance(await classify("status=401"), UpstreamCredentialsError)
    async with httpx.AsyncClient(base_url=sim.azure_endpoint, timeout=5) as http:
        response = await http.post(url(), json=chat(), headers={"authorization": f"Bearer {KEY}"})
    refused = classify_http_error(response.status_code, response.json(), response.headers)
    assert isinstance(refused, UpstreamCredentialsError)
