"""Spans and metrics, captured with the SDK's in-memory exporter and reader."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import Telemetry
from tests.integration.conftest import AppFactory

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Captured:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.telemetry = Telemetry(provider, MeterProvider(metric_readers=[self.metrics]))

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def server_span(self) -> ReadableSpan:
        [span] = [s for s in self.finished() if s.kind == SpanKind.SERVER]
        return span

    def attempt_spans(self) -> list[ReadableSpan]:
        return sorted(
            (s for s in self.finished() if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time or 0
        )

    def metric_points(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [
            point
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@pytest.fixture
def captured() -> Iterator[Captured]:
    yield Captured()


async def started(
    start_app: AppFactory, captured: Captured, **overrides: Any
) -> tuple[App, grpc.aio.Channel]:
    app = await start_app(telemetry=captured.telemetry, retry_base_s=0.01, retry_cap_s=0.05, **overrides)
    return app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")


async def call(
    channel: grpc.aio.Channel, model: str, *, traceparent: bool = True, timeout: float = 10, **fields: Any
) -> grpc.StatusCode:
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    fields.setdefault("messages", [pb.Message(role=pb.ROLE_USER, text="hello")])
    fields.setdefault("user_id", "u1")
    metadata = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),) if traceparent else ()
    try:
        async for _ in stub.Complete(
            pb.CompleteRequest(model=model, **fields), timeout=timeout, metadata=metadata
        ):
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_success_span_tree_and_attributes(
    start_app: AppFactory, simulator: Simulator, captured: Captured
) -> None:
    app, channel = await started(start_app, captured)
    async with channel:
        code = await call(
            channel,
            "gpt-4o-mini::chunks=7",
            temperature=0.5,
            max_completion_tokens=100,
            seed=3,
            service_tier=pb.SERVICE_TIER_AUTO,
            reasoning_effort=pb.REASONING_EFFORT_LOW,
        )
    assert code == grpc.StatusCode.OK

    server = captured.server_span()
    assert server.name == "chatgate.v1.ChatService/Complete"
    assert f"{server.context.trace_id:032x}" == CALLER_TRACE  # continued the caller's trace
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CALLER_SPAN
    attrs = server.attributes or {}
    assert attrs["rpc.system"] == "grpc"
    assert attrs["rpc.service"] == "chatgate.v1.ChatService"
    assert attrs["rpc.method"] == "Complete"
    assert attrs["rpc.grpc.status_code"] == 0
    assert attrs["chatgate.breaker.state"] == "closed"
    assert server.status.status_code == StatusCode.UNSET

    [attempt] = captured.attempt_spans()
    assert attempt.name == "chat gpt-4o-mini::chunks=7"
    assert attempt.parent is not None and attempt.parent.span_id == server.context.span_id
    a = attempt.attributes or {}
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini::chunks=7"
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.request.max_tokens"] == 100
    assert a["gen_ai.request.seed"] == 3
    assert a["openai.request.service_tier"] == "auto"
    assert a["openai.response.service_tier"] == "default"  # the tier that served it
    assert a["chatgate.request.reasoning_effort"] == "low"
    assert "chatgate.request.verbosity" not in a  # unset options are left out
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] == simulator.port
    assert a["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert str(a["gen_ai.response.id"]).startswith("chatcmpl-")
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)  # type: ignore[arg-type]
    assert a["gen_ai.usage.output_tokens"] == 7
    assert int(a["gen_ai.usage.input_tokens"]) > 0  # type: ignore[arg-type]
    assert a["gen_ai.usage.cache_read.input_tokens"] == 0
    assert a["gen_ai.usage.reasoning.output_tokens"] == 0
    assert float(a["gen_ai.response.time_to_first_chunk"]) > 0  # type: ignore[arg-type]
    assert "error.type" not in a
    # No per-token events, and no message content anywhere.
    assert not attempt.events
    for span in captured.finished():
        assert "hello" not in str(span.attributes) + str(span.events)

    # The ledger's write span links back to the call.
    assert app.ledger is not None
    await app.ledger.flush()
    for _ in range(100):
        writes = [s for s in captured.finished() if s.name == "usage.write"]
        if writes:
            break
        await asyncio.sleep(0.02)
    [write] = writes
    assert any(link.context.span_id == server.context.span_id for link in write.links)
    assert (write.attributes or {})["db.system.name"] == "postgresql"
    durations = captured.metric_points("gen_ai.client.operation.duration")
    assert durations and durations[0].count >= 1
    assert list(durations[0].explicit_bounds)[:3] == [0.01, 0.02, 0.04]
    tokens = {
        p.attributes["gen_ai.token.type"]: p.sum for p in captured.metric_points("gen_ai.client.token.usage")
    }
    assert tokens["output"] == 7
    assert captured.metric_points("gen_ai.client.operation.time_to_first_chunk")


async def test_usage_row_has_the_trace_id(
    start_app: AppFactory, simulator: Simulator, captured: Captured, db: Any
) -> None:
    app, channel = await started(start_app, captured)
    async with channel:
        await call(channel, "gpt-4o-mini", request_id="traced-row-1")
    assert app.ledger is not None
    await app.ledger.flush()
    (trace_id,) = db.execute(
        "SELECT trace_id FROM usage_records WHERE request_id = 'traced-row-1'"
    ).fetchone()
    assert trace_id == CALLER_TRACE


async def test_429_then_success_has_two_attempts_and_a_retry_event(
    start_app: AppFactory, simulator: Simulator, captured: Captured
) -> None:
    _, channel = await started(start_app, captured)
    async with channel:
        assert await call(channel, "gpt-4o-mini::rate_limit,times=1,retry_after_ms=50") == grpc.StatusCode.OK
    first, second = captured.attempt_spans()
    assert (first.attributes or {})["error.type"] == "429"
    assert first.status.status_code == StatusCode.ERROR
    assert second.status.status_code == StatusCode.UNSET
    [event] = [e for e in captured.server_span().events if e.name == "chatgate.retry"]
    ev = event.attributes or {}
    assert ev["chatgate.retry.reason"] == "retry_after"
    assert ev["chatgate.retry.wait_s"] == 0.05
    assert ev["error.type"] == "429"


async def test_breaker_open_rejection(
    start_app: AppFactory, simulator: Simulator, captured: Captured
) -> None:
    _, channel = await started(start_app, captured, retry_max_attempts=1, breaker_failure_threshold=2)
    async with channel:
        await call(channel, "gpt-4o-mini::status=500")
        await call(channel, "gpt-4o-mini::status=500")
        captured.spans.clear()
        assert await call(channel, "gpt-4o-mini") == grpc.StatusCode.UNAVAILABLE
    server = captured.server_span()
    assert (server.attributes or {})["chatgate.breaker.state"] == "open"
    assert (server.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert server.status.status_code == StatusCode.ERROR
    assert captured.attempt_spans() == []  # never reached the upstream


async def test_breaker_transition_is_an_event(
    start_app: AppFactory, simulator: Simulator, captured: Captured
) -> None:
    _, channel = await started(start_app, captured, retry_max_attempts=1, breaker_failure_threshold=1)
    async with channel:
        await call(channel, "gpt-4o-mini::status=500")
    [event] = [e for e in captured.server_span().events if e.name == "chatgate.breaker.transition"]
    assert (event.attributes or {})["chatgate.breaker.to"] == "open"


async def test_deadline_cut(start_app: AppFactory, simulator: Simulator, captured: Captured) -> None:
    _, channel = await started(start_app, captured, deadline_cap_s=1.0)
    async with channel:
        assert await call(channel, "gpt-4o-mini::stall_after=2") == grpc.StatusCode.DEADLINE_EXCEEDED
    server = captured.server_span()
    assert server.status.status_code == StatusCode.ERROR
    assert (server.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    [attempt] = captured.attempt_spans()
    assert (attempt.attributes or {})["error.type"] == "DeadlineExceeded"
    assert (attempt.attributes or {})["chatgate.usage.source"] == "estimated"


async def test_client_cancel(start_app: AppFactory, simulator: Simulator, captured: Captured) -> None:
    _, channel = await started(start_app, captured)
    async with channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        req = pb.CompleteRequest(
            model="gpt-4o-mini::chunks=100,delay_ms=20",
            user_id="u",
            messages=[pb.Message(role=pb.ROLE_USER, text="x")],
        )
        stream = stub.Complete(req)
        await stream.read()
        await stream.read()
        stream.cancel()
        for _ in range(100):
            if any(s.kind == SpanKind.SERVER for s in captured.finished()):
                break
            await asyncio.sleep(0.02)
    server = captured.server_span()
    attrs = server.attributes or {}
    assert attrs["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert attrs["chatgate.outcome"] == "cancelled"
    assert server.status.status_code == StatusCode.UNSET  # the caller leaving is not our error
    [attempt] = captured.attempt_spans()
    assert (attempt.attributes or {})["chatgate.cancelled"] is True


async def test_invalid_request(start_app: AppFactory, simulator: Simulator, captured: Captured) -> None:
    _, channel = await started(start_app, captured)
    async with channel:
        assert await call(channel, "gpt-4o-mini", user_id="") == grpc.StatusCode.INVALID_ARGUMENT
    server = captured.server_span()
    assert (server.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert server.status.status_code == StatusCode.UNSET  # a caller mistake is not a server error
    assert captured.attempt_spans() == []


async def test_without_traceparent_a_new_trace_starts(
    start_app: AppFactory, simulator: Simulator, captured: Captured
) -> None:
    _, channel = await started(start_app, captured)
    async with channel:
        await call(channel, "gpt-4o-mini", traceparent=False)
    server = captured.server_span()
    assert server.parent is None
    assert f"{server.context.trace_id:032x}" != CALLER_TRACE


async def test_each_worker_reports_its_cpu_time(start_app: AppFactory, captured: Captured) -> None:
    _, channel = await started(start_app, captured)
    async with channel:
        points = {p.attributes["cpu.mode"]: p.value for p in captured.metric_points("process.cpu.time")}
    assert set(points) == {"user", "system"}
    assert points["user"] > 0
