"""Upstream text never reaches the caller, and upstream retry hints are clamped.

The simulator answers with OpenAI's own error bodies only, so these tests put a small
HTTP server on a real loopback socket in front of chatgate: it answers every request
with the status, headers and body a test gives it, like a hostile or broken upstream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.errors import MAX_RETRY_DELAY_S
from chatgate_server.telemetry import NO_TELEMETRY
from tests.integration.conftest import TEST_API_KEY, make_settings

LIVE_KEY = "sk_live_51HxYzAbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class CannedUpstream:
    """An HTTP/1.1 server that reads each request and answers with ``answer``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            self.requests += 1
            a = self.answer
            headers = {"content-type": "application/json", **a.headers}
            lines = [f"HTTP/1.1 {a.status} X", *(f"{k}: {v}" for k, v in headers.items())]
            lines += [f"content-length: {len(a.body)}", "connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1") + a.body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[CannedUpstream]:
    server = CannedUpstream(Answer(500, b""))
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="module")
async def gateway(migrated_database_url: str, upstream: CannedUpstream) -> AsyncIterator[App]:
    base_url = await upstream.start()
    # One app for the module: no retries to wait for, and a breaker that never opens
    # on the failures these tests provoke one after another.
    settings = make_settings(
        migrated_database_url, base_url, retry_max_attempts=1, breaker_failure_threshold=1000
    )
    app = App(settings, telemetry=NO_TELEMETRY)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(0)


@dataclass
class Outcome:
    code: grpc.StatusCode
    message: str
    trailers: bytes
    info: error_details_pb2.ErrorInfo
    retry_delay: float | None


async def complete(app: App) -> Outcome:
    request = pb.CompleteRequest(
        model="gpt-4o-mini", user_id="u1", messages=[pb.Message(role=pb.ROLE_USER, text="hi")]
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Complete(request, timeout=10):
                pass
    error = caught.value
    status = rpc_status.from_call(error)
    info, delay = error_details_pb2.ErrorInfo(), None
    if status is not None:
        for detail in status.details:
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(retry):
                delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
            detail.Unpack(info)
    trailers = b"".join(v if isinstance(v, bytes) else v.encode() for _, v in error.trailing_metadata() or ())
    return Outcome(error.code(), error.details() or "", trailers, info, delay)


def error_body(code: str, **more: object) -> bytes:
    fields = {"message": code, "type": "invalid_request_error", "param": code, "code": code, **more}
    return json.dumps({"error": fields}).encode()


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_a_rejection_never_echoes_the_upstream_code(
    gateway: App, upstream: CannedUpstream, status: int
) -> None:
    upstream.answer = Answer(status, error_body(LIVE_KEY), {"x-request-id": LIVE_KEY})
    outcome = await complete(gateway)
    for seen in (outcome.message.encode(), outcome.trailers):
        assert b"sk_live" not in seen and TEST_API_KEY.encode() not in seen
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert outcome.info.reason == "UPSTREAM_REJECTED_REQUEST"
    assert dict(outcome.info.metadata) == {"cause": "OTHER"}


async def test_a_huge_upstream_code_still_gives_our_status(gateway: App, upstream: CannedUpstream) -> None:
    # 20,000 characters once made the status overflow gRPC's 8 KiB trailer limit:
    # the caller got RESOURCE_EXHAUSTED, which clients retry.
    upstream.answer = Answer(400, error_body("x" * 20_000))
    outcome = await complete(gateway)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert outcome.info.reason == "UPSTREAM_REJECTED_REQUEST"
    assert len(outcome.message) < 200


async def test_a_known_upstream_code_maps_to_our_cause(gateway: App, upstream: CannedUpstream) -> None:
    upstream.answer = Answer(400, error_body("context_length_exceeded"))
    outcome = await complete(gateway)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(outcome.info.metadata) == {"cause": "CONTEXT_LENGTH_EXCEEDED"}
    assert "context window" in outcome.message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "1e300"}, MAX_RETRY_DELAY_S),
        ({"retry-after-ms": "1e306"}, MAX_RETRY_DELAY_S),
        ({"retry-after": "inf"}, MAX_RETRY_DELAY_S),
        ({"retry-after": "-30"}, 0.0),
        ({"retry-after": "nan"}, None),
    ],
)
async def test_an_absurd_retry_after_is_clamped(
    gateway: App, upstream: CannedUpstream, headers: dict[str, str], expected: float | None
) -> None:
    body = json.dumps({"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}})
    upstream.answer = Answer(429, body.encode(), headers)
    outcome = await complete(gateway)
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert outcome.info.reason == "UPSTREAM_RATE_LIMITED"
    assert outcome.retry_delay == expected


async def test_a_mid_stream_error_event_never_echoes_its_code(gateway: App, upstream: CannedUpstream) -> None:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "par"}}],
    }
    error = {"error": {"message": LIVE_KEY, "type": "server_error", "code": LIVE_KEY, "param": LIVE_KEY}}
    body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\n".encode()
    upstream.answer = Answer(200, body, {"content-type": "text/event-stream"})
    outcome = await complete(gateway)
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert b"sk_live" not in outcome.message.encode() and b"sk_live" not in outcome.trailers
