"""The fault matrix: what a caller gets for each way the upstream can misbehave.

Each case runs a real call through chatgate against a simulator scenario and checks
the gRPC status and its details, how many attempts reached the upstream, that the call
ended within its deadline, what the caller received before the error, and that the
key appears nowhere in what the caller sees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.deadline import final_event_margin
from chatgate_server.simulator import Simulator
from chatgate_server.simulator.content import text_of
from tests.integration.conftest import TEST_API_KEY, AppFactory

if TYPE_CHECKING:
    from chatgate.v1.chat_pb2_grpc import ChatServiceAsyncStub

FAST_RETRIES: dict[str, Any] = {"retry_base_s": 0.02, "retry_cap_s": 0.1}


@dataclass
class Result:
    events: list[pb.CompleteResponse] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    reason: str | None = None
    retry_after: float | None = None
    details_text: str = ""
    elapsed: float = 0.0

    @property
    def text(self) -> str:
        return "".join(e.content.text for e in self.events if e.WhichOneof("event") == "content")

    @property
    def kinds(self) -> list[str | None]:
        return [e.WhichOneof("event") for e in self.events]


async def call(stub: ChatServiceAsyncStub, model: str, timeout: float = 10.0) -> Result:
    req = pb.CompleteRequest(
        model=model, user_id="u1", messages=[pb.Message(role=pb.ROLE_USER, text="hello")]
    )
    result = Result()
    t0 = time.monotonic()
    try:
        async for event in stub.Complete(req, timeout=timeout):
            result.events.append(event)
    except grpc.aio.AioRpcError as exc:
        result.code = exc.code()
        result.message = exc.details() or ""
        status = rpc_status.from_call(exc)
        if status is not None:
            result.details_text = str(status)
            for detail in status.details:
                info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    result.reason = info.reason
                elif detail.Unpack(retry):
                    result.retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    result.elapsed = time.monotonic() - t0
    return result


async def open_stub(start_app: AppFactory, **overrides: Any) -> tuple[grpc.aio.Channel, ChatServiceAsyncStub]:
    app = await start_app(**{**FAST_RETRIES, **overrides})
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return channel, chat_pb2_grpc.ChatServiceStub(channel)


def assert_no_secret(result: Result) -> None:
    assert TEST_API_KEY not in result.message
    assert TEST_API_KEY not in result.details_text


@pytest.mark.parametrize(
    ("scenario", "code", "reason", "attempts"),
    [
        ("rate_limit,times=1,retry_after_ms=150", grpc.StatusCode.OK, None, 2),
        ("status=500,times=2", grpc.StatusCode.OK, None, 3),
        ("rate_limit,retry_after_ms=20", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_RATE_LIMITED", 3),
        ("insufficient_quota", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_CREDENTIALS", 1),
        ("too_large", grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_TOO_LARGE", 1),
        ("status=400", grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", 1),
        ("status=404", grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", 1),
        ("status=401", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_CREDENTIALS", 1),
        ("status=403", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_CREDENTIALS", 1),
        ("status=503", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", 3),
        ("status=502,times=1", grpc.StatusCode.OK, None, 2),
        ("status=408,times=1", grpc.StatusCode.OK, None, 2),
        ("status=409,times=1", grpc.StatusCode.OK, None, 2),
        ("status=500,should_retry=false", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", 1),
    ],
)
async def test_error_before_the_first_event(
    start_app: AppFactory,
    simulator: Simulator,
    scenario: str,
    code: grpc.StatusCode,
    reason: str | None,
    attempts: int,
) -> None:
    channel, stub = await open_stub(start_app)
    async with channel:
        result = await call(stub, f"gpt-4o-mini::{scenario}")
    assert result.code == code, result.message
    assert result.reason == reason
    assert len(simulator.requests) == attempts
    assert_no_secret(result)
    if code == grpc.StatusCode.OK:
        assert result.kinds[0] == "started" and result.kinds[-1] == "finished"
        assert result.text == text_of(12)
    else:
        # Nothing at all reached the caller: its own retry policy stays usable.
        assert result.events == []


async def test_retry_after_is_waited_exactly(start_app: AppFactory, simulator: Simulator) -> None:
    channel, stub = await open_stub(start_app)
    async with channel:
        result = await call(stub, "gpt-4o-mini::rate_limit,times=1,retry_after_ms=400")
    assert result.code == grpc.StatusCode.OK
    first, second = simulator.requests
    assert second.started_at - first.started_at >= 0.4


async def test_rate_limited_after_retries_says_when_to_come_back(
    start_app: AppFactory, simulator: Simulator
) -> None:
    channel, stub = await open_stub(start_app)
    async with channel:
        result = await call(stub, "gpt-4o-mini::rate_limit,retry_after_ms=20")
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert result.retry_after is not None and result.retry_after == pytest.approx(0.02, abs=0.005)


async def test_upstream_credentials_message_is_short_and_generic(
    start_app: AppFactory, simulator: Simulator
) -> None:
    channel, stub = await open_stub(start_app)
    async with channel:
        result = await call(stub, "gpt-4o-mini::status=401")
    assert "upstream credentials" in result.message
    # Never the upstream's own body (which names the key's prefix on a real 401).
    assert "Incorrect API key" not in result.message and "sk-" not in result.message


async def test_retry_after_beyond_the_deadline_is_not_slept(
    start_app: AppFactory, simulator: Simulator
) -> None:
    channel, stub = await open_stub(start_app, retry_base_s=5.0, retry_cap_s=5.0)
    async with channel:
        result = await call(stub, "gpt-4o-mini::status=503", timeout=1.0)
    # Backoff waits of up to 5 s do not fit a 1 s deadline: either the jitter happened
    # to fit or the call ends at once; it never overruns the deadline.
    assert result.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert result.elapsed < 1.0 + 0.3


async def test_hang_before_headers_is_retried_after_the_first_byte_timeout(
    start_app: AppFactory, simulator: Simulator
) -> None:
    channel, stub = await open_stub(start_app, upstream_first_byte_timeout_s=0.3)
    async with channel:
        result = await call(stub, "gpt-4o-mini::hang", timeout=5.0)
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert len(simulator.requests) == 3
    assert result.elapsed < 5.0
    await simulator.wait_idle(timeout=2.0)
    assert all(r.closed_early for r in simulator.requests)


async def test_hang_is_cut_at_the_callers_deadline(start_app: AppFactory, simulator: Simulator) -> None:
    channel, stub = await open_stub(start_app)
    async with channel:
        result = await call(stub, "gpt-4o-mini::hang", timeout=1.0)
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # Cut a margin before the caller's deadline (room for a final event: deadline.py).
    assert 1.0 - final_event_margin(1.0) - 0.05 < result.elapsed < 1.0 + 0.3
    await simulator.wait_idle(timeout=2.0)
    assert simulator.open_streams == 0


async def test_stall_mid_stream_is_cut_at_the_cap_keeping_what_was_sent(
    start_app: AppFactory, simulator: Simulator
) -> None:
    channel, stub = await open_stub(start_app, deadline_cap_s=1.0)
    async with channel:
        result = await call(stub, "gpt-4o-mini::stall_after=3", timeout=30)
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # Cut a margin before the caller's deadline (room for a final event: deadline.py).
    assert 1.0 - final_event_margin(1.0) - 0.05 < result.elapsed < 1.0 + 0.3
    # The three tokens (merged, when they arrived together) then the final event.
    assert result.kinds[0] == "started" and result.kinds[-1] == "finished"
    assert set(result.kinds[1:-1]) == {"content"}
    assert result.text == text_of(3)
    finished = result.events[-1].finished
    assert finished.outcome == pb.OUTCOME_DEADLINE_EXCEEDED
    assert finished.usage.output_tokens > 0
    assert len(simulator.requests) == 1
    await simulator.wait_idle(timeout=2.0)
    assert simulator.requests[0].closed_early


@pytest.mark.parametrize(
    ("scenario", "reason"),
    [
        ("disconnect_after=3", "UPSTREAM_UNAVAILABLE"),
        ("error_event_after=3", "UPSTREAM_UNAVAILABLE"),
        ("malformed_after=3", "UPSTREAM_PROTOCOL_ERROR"),
    ],
)
async def test_failure_after_the_first_token_is_never_retried(
    start_app: AppFactory, simulator: Simulator, scenario: str, reason: str
) -> None:
    channel, stub = await open_stub(start_app)
    async with channel:
        result = await call(stub, f"gpt-4o-mini::{scenario}")
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert result.reason == reason
    assert len(simulator.requests) == 1
    # The three tokens (merged, when they arrived together) then the final event.
    assert result.kinds[0] == "started" and result.kinds[-1] == "finished"
    assert set(result.kinds[1:-1]) == {"content"}
    assert result.text == text_of(3)
    assert result.events[-1].finished.outcome == pb.OUTCOME_UPSTREAM_ERROR
    assert_no_secret(result)
