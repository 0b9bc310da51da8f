"""The edge, against a real server: what every call gets whatever it sends, and the
limits that keep one kind of call from locking out the others (issue 13, items 2, 3, 9
and 10; issue 12, item 5)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc, usage_pb2, usage_pb2_grpc
from chatgate_server.app import App
from chatgate_server.rpc.edge import Edge, EdgeLimits
from chatgate_server.simulator import Simulator
from tests.integration.conftest import TEST_API_KEY, AppFactory

COMPLETE = "/chatgate.v1.ChatService/Complete"
GET_USAGE = "/chatgate.v1.UsageService/GetUsage"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def request(model: str = "gpt-4o-mini", text: str = "hi", request_id: str = "") -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=model,
        user_id="edge-user",
        messages=[pb.Message(role=pb.ROLE_USER, text=text)],
        request_id=request_id,
    )


def details(error: grpc.aio.AioRpcError) -> tuple[str, float | None, list[str]]:
    """ErrorInfo reason, RetryInfo seconds (None when absent), and the BadRequest descriptions."""
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} {error.details()} came without rich details"
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    bad = error_details_pb2.BadRequest()
    has_retry = False
    for detail in status.details:
        detail.Unpack(info)
        has_retry |= detail.Unpack(retry)
        detail.Unpack(bad)
    delay = retry.retry_delay.ToTimedelta().total_seconds() if has_retry else None
    return info.reason, delay, [v.description for v in bad.field_violations]


async def raw_complete(channel: grpc.aio.Channel, payload: bytes) -> grpc.aio.AioRpcError:
    """Send ``payload`` as the request bytes of a Complete call; return its failure."""
    call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
        COMPLETE, request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call(payload, timeout=10):
            pass
    return info.value


@asynccontextmanager
async def running(channel: grpc.aio.Channel, req: pb.CompleteRequest) -> AsyncIterator[None]:
    """A Complete call that has started (its first event arrived) and stays open."""
    call = chat_pb2_grpc.ChatServiceStub(channel).Complete(req, timeout=30)
    first = await call.read()
    assert isinstance(first, pb.CompleteResponse) and first.HasField("started")
    try:
        yield
    finally:
        call.cancel()


async def health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


def usage_request() -> usage_pb2.GetUsageRequest:
    start = timestamp_pb2.Timestamp()
    start.FromDatetime(datetime.now(UTC) - timedelta(days=1))
    return usage_pb2.GetUsageRequest(start_time=start)


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll state the server holds (not a fixed sleep): up to 10 s."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the server never reached the expected state")


def target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


# --- item 2: the stream limit is Complete's alone --------------------------------------


async def test_health_and_usage_answer_while_complete_is_at_its_limit(start_app: AppFactory) -> None:
    app = await start_app(max_concurrent_streams=2)
    async with grpc.aio.insecure_channel(target(app)) as channel:
        stalled = request("gpt-4o-mini::stall_after=1")
        async with running(channel, stalled), running(channel, stalled):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in chat_pb2_grpc.ChatServiceStub(channel).Complete(request(), timeout=10):
                    pass
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
            reply = await usage_pb2_grpc.UsageServiceStub(channel).GetUsage(usage_request(), timeout=10)
            assert reply.HasField("totals")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reason, delay, _ = details(refused.value)
        assert reason == "CONCURRENCY_LIMIT" and delay is not None and delay > 0
        # Both streams ended: the slots are free again.
        await wait_until(lambda: app.edge is not None and app.edge.streams == 0)
        events = [e async for e in chat_pb2_grpc.ChatServiceStub(channel).Complete(request(), timeout=10)]
        assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED


# --- item 3: idle health watches take no call capacity ---------------------------------


async def test_idle_health_watches_lock_nobody_out(start_app: AppFactory) -> None:
    app = await start_app(max_concurrent_streams=4, max_health_watches=6, max_health_watches_per_connection=3)
    async with AsyncExitStack() as stack:
        watches: list[Any] = []

        async def watch(channel: grpc.aio.Channel) -> Any:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            watches.append(call)
            return call

        # A subchannel pool of its own per channel: three connections, not one shared.
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(target(app), options=options))
            for _ in range(3)
        ]
        # Three watches on each of two connections: at both caps, and all serving.
        for channel in channels[:2]:
            for _ in range(3):
                first = await (await watch(channel)).read()
                assert first.status == health_pb2.HealthCheckResponse.SERVING
        over_connection = await watch(channels[0])
        over_global = await watch(channels[2])
        for refused in (over_connection, over_global):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await refused.read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details(info.value)[0] == "HEALTH_WATCH_LIMIT"
        # Six idle watches, more than the stream limit: calls and checks still run.
        events = [e async for e in chat_pb2_grpc.ChatServiceStub(channels[2]).Complete(request(), timeout=10)]
        assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
        assert await health(channels[2]) == health_pb2.HealthCheckResponse.SERVING
        for call in watches:
            call.cancel()
        await wait_until(lambda: app.edge is not None and app.edge.watches == 0)


# --- item 9: oversized and undecodable requests are INVALID_ARGUMENT --------------------


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (lengths here stay below 2**14)."""
    length = len(payload)
    varint = bytes([length]) if length < 128 else bytes([(length & 0x7F) | 0x80, length >> 7])
    return bytes([(number << 3) | 2]) + varint + payload


def _deep_struct(depth: int) -> bytes:
    """A google.protobuf.Struct nested ``depth`` levels (Struct → Value.struct_value → …)."""
    inner = b""
    for _ in range(depth):
        entry = _field(1, b"k") + _field(2, _field(5, inner))
        inner = _field(1, entry)
    return inner


UNDECODABLE = {
    "garbage": b"\xff\xfe\xfd\xfc\xfb",
    "truncated varint": b"\x08\xff\xff",
    "invalid utf-8 in model": _field(1, b"gpt-\xc3\x28"),
    "struct past the recursion limit": _field(13, _field(1, b"t") + _field(3, _deep_struct(150))),
}


CORRUPT_FOR_ALL = (UNDECODABLE["garbage"], UNDECODABLE["truncated varint"])


@pytest.mark.parametrize("payload", UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_undecodable_bytes_are_invalid_argument(
    start_app: AppFactory, simulator: Simulator, payload: bytes
) -> None:
    app = await start_app()
    async with grpc.aio.insecure_channel(target(app)) as channel:
        error = await raw_complete(channel, payload)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        reason, delay, descriptions = details(error)
        assert (reason, delay) == ("INVALID_REQUEST", None)
        assert "not a valid CompleteRequest" in descriptions[0]
        # Bytes that no message decodes: the same for the other services.
        for method in (GET_USAGE, HEALTH_CHECK) if payload in CORRUPT_FOR_ALL else ():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                    method, request_serializer=None, response_deserializer=None
                )
                await unary(payload, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert simulator.requests == []


@pytest.mark.parametrize("size", [4096 + 1, 4096 + 100_000, 10 * 1024 * 1024], ids=["1B", "100KB", "10MB"])
async def test_every_oversized_request_is_invalid_argument_naming_the_limit(
    start_app: AppFactory, simulator: Simulator, size: int
) -> None:
    app = await start_app(max_request_bytes=4096)
    overhead = len(request(text="x").SerializeToString()) + 3
    payload = request(text="x" * (size - overhead)).SerializeToString()
    while len(payload) < size:
        payload = request(text="x" * (size - overhead + size - len(payload))).SerializeToString()
    async with grpc.aio.insecure_channel(target(app), options=[("grpc.max_send_message_length", -1)]) as ch:
        error = await raw_complete(ch, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    reason, delay, descriptions = details(error)
    assert (reason, delay) == ("INVALID_REQUEST", None)
    assert descriptions == [f"the request is {len(payload)} bytes; the limit is 4096 bytes"]
    assert simulator.requests == []


# --- item 10: request bytes in flight are bounded ---------------------------------------


async def test_request_bytes_in_flight_are_bounded(start_app: AppFactory) -> None:
    app = await start_app(max_request_bytes=40_000, max_request_bytes_in_flight=100_000)
    big = request("gpt-4o-mini::stall_after=1", text="x" * 35_000)
    async with grpc.aio.insecure_channel(target(app)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        async with running(channel, big), running(channel, big):
            assert app.edge is not None and 70_000 < app.edge.bytes_in_flight < 80_000
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Complete(big, timeout=10):
                    pass
            # A small request still fits beside them.
            events = [e async for e in stub.Complete(request(), timeout=10)]
            assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reason, delay, _ = details(refused.value)
        assert reason == "REQUEST_BYTES_LIMIT" and delay is not None and delay > 0
        await wait_until(lambda: app.edge is not None and app.edge.bytes_in_flight == 0)
        async with running(channel, big):
            pass  # the budget is back


# --- issue 12 item 5: one access line per call, whatever its end ------------------------


async def test_every_call_leaves_one_access_line(
    start_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = await start_app(max_request_bytes=4096)
    caplog.set_level(logging.INFO, logger="chatgate.access")
    async with grpc.aio.insecure_channel(target(app)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        ok = [e async for e in stub.Complete(request(request_id="edge-ok-1"), timeout=10)]
        assert ok[-1].finished.outcome == pb.OUTCOME_COMPLETED
        for bad in (
            request(model=""),  # invalid
            request(request_id="edge-ok-1", text="something else"),  # ALREADY_EXISTS
            request(text="x" * 5000),  # oversized
        ):
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in stub.Complete(bad, timeout=10):
                    pass
        await raw_complete(channel, b"\xff\xff")  # undecodable
    lines = [r.access for r in caplog.records if r.name == "chatgate.access"]  # type: ignore[attr-defined]
    complete = [a for a in lines if a["method"] == COMPLETE]
    assert [(a["status"], a["reason"]) for a in complete] == [
        ("OK", None),
        ("INVALID_ARGUMENT", "INVALID_REQUEST"),
        ("ALREADY_EXISTS", "DUPLICATE_REQUEST_ID"),
        ("INVALID_ARGUMENT", "INVALID_REQUEST"),
        ("INVALID_ARGUMENT", "INVALID_REQUEST"),
    ]
    assert complete[0]["outcome"] == "completed" and complete[0]["request_id"] == "edge-ok-1"
    # The refused duplicate still names its request id, caller and tenant.
    assert (complete[2]["request_id"], complete[2]["tenant"], complete[2]["caller"]) == (
        "edge-ok-1",
        "default",
        "unknown",
    )
    assert all(a["duration_ms"] >= 0 for a in complete)


# --- anything unexpected: a short INTERNAL, logged once ----------------------------------


class Broken(chat_pb2_grpc.ChatServiceServicer):
    """A ChatService with a bug that leaks a secret into its exception."""

    async def Complete(  # type: ignore[override]
        self,
        request: pb.CompleteRequest,
        context: grpc.aio.ServicerContext[pb.CompleteRequest, pb.CompleteResponse],
    ) -> None:
        raise RuntimeError(f"bug while holding {TEST_API_KEY}")


async def test_an_unexpected_error_is_a_short_internal_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    server = grpc.aio.server(interceptors=(Edge(EdgeLimits()),))
    chat_pb2_grpc.add_ChatServiceServicer_to_server(Broken(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    caplog.set_level(logging.INFO)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in chat_pb2_grpc.ChatServiceStub(channel).Complete(request(), timeout=10):
                    pass
    finally:
        await server.stop(0)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INTERNAL, "internal error")
    assert details(info.value)[0] == "INTERNAL"
    assert TEST_API_KEY not in str(info.value.trailing_metadata())
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert len(logged) == 1 and logged[0].name == "chatgate_server.rpc.edge"
    access = [r.access for r in caplog.records if r.name == "chatgate.access"]  # type: ignore[attr-defined]
    assert [(a["status"], a["reason"]) for a in access] == [("INTERNAL", "INTERNAL")]
