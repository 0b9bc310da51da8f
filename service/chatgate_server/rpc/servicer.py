"""ChatService: proto in, domain call, proto out. No business logic lives here."""

from __future__ import annotations

import asyncio
import logging

import grpc

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.completion import CompletionService, OutboundEvent
from chatgate_server.deadline import Deadline
from chatgate_server.domain import ANONYMOUS_CALLER
from chatgate_server.errors import ChatgateError
from chatgate_server.rpc import convert
from chatgate_server.rpc.status import to_status
from chatgate_server.rpc.tracing import server_span, set_rpc_status, trace_ids
from chatgate_server.telemetry import NO_TELEMETRY, Telemetry

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ChatService"].full_name


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Serves chatgate.v1.ChatService over a CompletionService."""

    def __init__(
        self,
        service: CompletionService,
        *,
        deadline_cap_s: float,
        limits: convert.RequestLimits = convert.DEFAULT_LIMITS,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self._service = service
        self._limits = limits
        self._deadline_cap_s = deadline_cap_s
        self._telemetry = telemetry

    # A coroutine handler that writes with context.write() (grpc.aio allows both
    # forms for server streaming; the generated stub types only the generator form):
    # the CompletionService drives the loop and owns every way a call ends.
    async def Complete(  # type: ignore[override]
        self,
        request: pb.CompleteRequest,
        context: grpc.aio.ServicerContext[pb.CompleteRequest, pb.CompleteResponse],
    ) -> None:
        # One deadline for the whole call, computed before anything else.
        deadline = Deadline.start(context.time_remaining(), self._deadline_cap_s)
        to_proto = convert.to_proto
        write = context.write

        async def send(event: OutboundEvent) -> None:
            await write(to_proto(event))

        active = self._telemetry.active_streams
        active.add(1)
        with server_span(self._telemetry, context, SERVICE, "Complete") as span:
            trace_id, span_id = trace_ids(span)
            try:
                domain_request = convert.to_domain(request, ANONYMOUS_CALLER, self._limits)
                span.set_attribute("chatgate.request_id", domain_request.request_id)
                await self._service.run(domain_request, deadline, send, trace_id=trace_id, span_id=span_id)
                set_rpc_status(span, grpc.StatusCode.OK)
            except ChatgateError as exc:
                status = to_status(exc)
                set_rpc_status(span, status.code, exc.reason)
                await context.abort_with_status(status)
            except asyncio.CancelledError:
                # The caller left: not an error of ours (CANCELLED is not an error on
                # server spans), but say so on the span — the stock interceptor doesn't.
                set_rpc_status(span, grpc.StatusCode.CANCELLED)
                span.set_attribute("chatgate.outcome", "cancelled")
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                # Logged once with the trace id (the log filter adds it); the caller
                # gets a generic INTERNAL with no detail.
                log.exception("unexpected error in Complete")
                set_rpc_status(span, grpc.StatusCode.INTERNAL, type(exc).__name__)
                await context.abort_with_status(to_status(ChatgateError("internal error")))
            finally:
                active.add(-1)
