"""A do-nothing OTLP/gRPC collector, so chatgate can be benchmarked with tracing on.

It accepts trace and metric exports and counts the spans; nothing is stored. It runs
on the load generator's core: a real collector is another process too. The suite
points chatgate at it with ``OTEL_EXPORTER_OTLP_ENDPOINT`` and samples a fraction of
traces (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``), as production would.

Run: ``python -m bench.otlp_sink --port P`` (prints one line once it listens).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc


class Traces(tgrpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0

    async def Export(self, request: Any, context: Any) -> Any:
        self.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return tpb.ExportTraceServiceResponse()


class Metrics(mgrpc.MetricsServiceServicer):
    async def Export(self, request: Any, context: Any) -> Any:
        return mpb.ExportMetricsServiceResponse()


async def serve(port: int) -> None:
    server = grpc.aio.server()
    traces = Traces()
    tgrpc.add_TraceServiceServicer_to_server(traces, server)  # type: ignore[no-untyped-call]
    mgrpc.add_MetricsServiceServicer_to_server(Metrics(), server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"otlp sink listening on http://127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"spans received: {traces.spans}", file=sys.stderr, flush=True)
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink")
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args(argv).port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
