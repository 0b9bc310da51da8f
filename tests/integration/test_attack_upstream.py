"""An upstream that lies, over a real socket: rate-limit headers with absurd values on
its 429s and its successes, and a stream whose one event never ends. Calls end with a
clear status (RetryInfo, when present, within its hour cap), never INTERNAL, never a
wait until the deadline; memory stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import grpc
import orjson

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.errors import MAX_RETRY_DELAY_S
from chatgate_server.telemetry import NO_TELEMETRY
from tests.integration.conftest import make_settings
from tests.integration.recording_upstream import _stream
from tests.integration.test_limits import quota

LIES = {
    "x-ratelimit-remaining-requests": "inf",
    "x-ratelimit-limit-requests": "nan",
    "x-ratelimit-reset-requests": "99999999h",
    "x-ratelimit-remaining-tokens": "-1e308",
    "x-ratelimit-reset-tokens": "nan",
    "retry-after": "99999999999999999999",
    "retry-after-ms": "inf",
}


class LyingUpstream:
    """Answers each request as ``answer`` says: (status line, extra headers, body writer)."""

    def __init__(self, answer: Callable[[int], tuple[int, dict[str, str]]], endless: bool = False) -> None:
        self.answer = answer
        self.endless = endless
        self.calls = 0
        self.sent = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = next(
                    int(line.split(":", 1)[1])
                    for line in head.split("\r\n")
                    if line.lower().startswith("content-length")
                )
                await reader.readexactly(length)
                self.calls += 1
                status, headers = self.answer(self.calls)
                extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
                if self.endless:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + extra + b"\r\ndata: "
                    )
                    block = b"a" * 65536
                    while self.sent < 64 << 20:  # 64 MiB at most, then the test has failed anyway
                        writer.write(block)
                        self.sent += len(block)
                        await writer.drain()
                    return
                body = (
                    _stream("gpt-4o-mini")
                    if status == 200
                    else orjson.dumps(
                        {
                            "error": {
                                "type": "rate_limit_exceeded",
                                "code": "rate_limit_exceeded",
                                "message": "slow",
                            }
                        }
                    )
                )
                kind = b"text/event-stream" if status == 200 else b"application/json"
                writer.write(
                    f"HTTP/1.1 {status} X\r\n".encode() + b"content-type: " + kind + b"\r\n" + extra
                    + f"content-length: {len(body)}\r\n\r\n".encode() + body
                )  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def gateway(database_url: str, upstream: LyingUpstream, **overrides: object) -> AsyncIterator[App]:
    url = await upstream.start()
    app = App(make_settings(database_url, url, **overrides), telemetry=NO_TELEMETRY)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(0)
        await upstream.stop()


async def call(app: App, user: str) -> list[pb.CompleteResponse] | grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        req = pb.CompleteRequest(
            model="gpt-4o-mini", user_id=user, messages=[pb.Message(role=pb.ROLE_USER, text="hi")]
        )
        try:
            return [e async for e in stub.Complete(req, timeout=20)]
        except grpc.aio.AioRpcError as exc:
            return exc


async def test_absurd_rate_limit_headers_on_429s_and_successes(migrated_database_url: str) -> None:
    # Two 429s with lies, then successes with lies: the call retries within its budget and
    # completes; later calls are not kept away for the hour or the day the lies ask for.
    upstream = LyingUpstream(lambda n: (429 if n <= 2 else 200, LIES))
    async with gateway(migrated_database_url, upstream, retry_max_attempts=3) as app:
        t0 = time.monotonic()
        got = await call(app, "u-liar")
        assert not isinstance(got, grpc.aio.AioRpcError), (got.code(), got.details())
        assert got[-1].finished.outcome == pb.OUTCOME_COMPLETED
        assert time.monotonic() - t0 < 10
        for i in range(3):
            later = await call(app, f"u-later-{i}")
            assert not isinstance(later, grpc.aio.AioRpcError), (later.code(), later.details())


async def test_a_429_with_absurd_retry_after_gives_a_bounded_retry_info(migrated_database_url: str) -> None:
    upstream = LyingUpstream(lambda n: (429, LIES))
    async with gateway(migrated_database_url, upstream, retry_max_attempts=2) as app:
        t0 = time.monotonic()
        got = await call(app, "u-429")
        assert isinstance(got, grpc.aio.AioRpcError)
        assert got.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED), got.details()
        _, delay, _ = quota(got)
        assert delay is None or 0 <= delay <= MAX_RETRY_DELAY_S, delay
        assert time.monotonic() - t0 < 10


async def test_an_event_that_never_ends_fails_the_call_without_filling_memory(
    migrated_database_url: str,
) -> None:
    upstream = LyingUpstream(lambda n: (200, {}), endless=True)
    async with gateway(migrated_database_url, upstream, retry_max_attempts=1) as app:
        t0 = time.monotonic()
        got = await call(app, "u-endless")
        assert isinstance(got, grpc.aio.AioRpcError), "an endless event cannot complete"
        assert got.code() == grpc.StatusCode.UNAVAILABLE, (got.code(), got.details())
        assert quota(got)[0] == "UPSTREAM_PROTOCOL_ERROR"
        assert time.monotonic() - t0 < 15
        assert upstream.sent < 16 << 20, upstream.sent  # stopped reading soon after the bound
