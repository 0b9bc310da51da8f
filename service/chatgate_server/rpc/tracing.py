"""The gRPC server span: continued from the caller's ``traceparent``, status set by us.

The stock aio server interceptor (opentelemetry-instrumentation-grpc) misses
``abort_with_status`` and cancellation and breaks coroutine handlers that use
``context.write`` (REFERENCE.md), so the edge (``rpc/edge.py``) makes the span with these
helpers and sets its status, since it is where every call's status is known.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import Span, SpanKind, StatusCode

from chatgate_server.telemetry import Telemetry

# On server spans only these codes mark an error (semantic conventions for RPC).
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


@contextmanager
def server_span(
    telemetry: Telemetry, context: grpc.aio.ServicerContext[Any, Any], service: str, method: str
) -> Iterator[Span]:
    """A SERVER span for one call, current for its duration, child of the caller's span."""
    metadata = context.invocation_metadata() or ()
    parent = extract({key: value for key, value in metadata if isinstance(value, str)})
    with telemetry.tracer.start_as_current_span(
        f"{service}/{method}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def set_rpc_status(span: Span, code: grpc.StatusCode, description: str | None = None) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERROR_CODES:
        span.set_status(StatusCode.ERROR, description)


def trace_ids(span: Span) -> tuple[str | None, str | None]:
    """The span's trace and span ids in W3C hex form, or None when there is no trace."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None, None
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)
