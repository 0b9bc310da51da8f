"""chatgate as a process, exporting to a real OTLP/gRPC receiver started by the test.

Also the secret scan: after a run of fault scenarios, the key appears in no exported
span, no metric and no log line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.simulator import Simulator
from tests.integration.conftest import TEST_API_KEY
from tests.integration.test_shutdown import free_port


class Receiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """A minimal OTLP/gRPC collector that keeps what it receives."""

    def __init__(self) -> None:
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    async def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self.traces.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()
        self.metrics.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def spans(self) -> list[Any]:
        return [
            s for req in self.traces for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans
        ]

    def metric_names(self) -> set[str]:
        return {
            m.name
            for req in self.metrics
            for rm in req.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    server = grpc.aio.server()
    rx = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rx, server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(rx, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield rx, port
    finally:
        await server.stop(0)


async def wait_healthy(target: str) -> None:
    deadline = time.monotonic() + 20
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, "chatgate did not become healthy"
            await asyncio.sleep(0.1)


SCENARIOS = [
    "",
    "::status=401",
    "::status=400",
    "::insufficient_quota",
    "::rate_limit,retry_after_ms=10",
    "::status=500,times=1",
    "::error_event_after=2",
    "::malformed_after=2",
    "::disconnect_after=2",
]


async def test_spans_reach_an_otlp_receiver_and_the_key_leaks_nowhere(
    receiver: tuple[Receiver, int], simulator: Simulator, migrated_database_url: str
) -> None:
    rx, rx_port = receiver
    port = free_port()
    env = {
        **os.environ,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": simulator.base_url,
        "DATABASE_URL": migrated_database_url,
        "CHATGATE_AUTH": "off",  # these tests are about processes, not callers
        "CHATGATE_LISTEN": f"127.0.0.1:{port}",
        # One process: these tests are about one server's behaviour (test_workers.py
        # covers the supervisor), and one process keeps them deterministic.
        "CHATGATE_WORKERS": "1",
        "CHATGATE_RETRY_BASE_SECONDS": "0.01",
        "CHATGATE_LOG_LEVEL": "DEBUG",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{rx_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": "chatgate-test",
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatgate_server", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    request_ids = []
    try:
        await wait_healthy(f"127.0.0.1:{port}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            for scenario in SCENARIOS:
                request_id = f"otlp-{uuid.uuid4().hex[:12]}"
                request_ids.append(request_id)
                req = pb.CompleteRequest(
                    model=f"gpt-4o-mini{scenario}",
                    user_id="scan",
                    request_id=request_id,
                    messages=[pb.Message(role=pb.ROLE_USER, text="hi")],
                )
                try:
                    async for _ in stub.Complete(req, timeout=10):
                        pass
                except grpc.aio.AioRpcError as exc:
                    assert TEST_API_KEY not in (exc.details() or "")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    logs = stderr.decode()

    # The first request's row leads to its spans at the receiver.
    with psycopg.connect(migrated_database_url) as conn:
        (trace_id,) = conn.execute(
            "SELECT trace_id FROM usage_records WHERE request_id = %s", (request_ids[0],)
        ).fetchone() or (None,)
    assert trace_id
    spans = [s for s in rx.spans() if s.trace_id.hex() == trace_id]
    names = {s.name for s in spans}
    assert "chatgate.v1.ChatService/Complete" in names
    assert "chat gpt-4o-mini" in names
    resource = rx.traces[0].resource_spans[0].resource
    assert any(
        a.key == "service.name" and a.value.string_value == "chatgate-test" for a in resource.attributes
    )
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage"} <= rx.metric_names()

    # Logs: JSON lines, one access line per call, with trace ids.
    access = [
        line
        for line in logs.splitlines()
        if '"logger":"chatgate.access"' in line and '"method":"/chatgate.v1.ChatService/Complete"' in line
    ]
    assert len(access) == len(SCENARIOS)
    assert all('"trace_id":"' in line for line in access)

    # The secret scan.
    assert TEST_API_KEY not in logs
    for export in rx.traces:
        assert TEST_API_KEY.encode() not in export.SerializeToString()
    for mreq in rx.metrics:
        assert TEST_API_KEY.encode() not in mreq.SerializeToString()
