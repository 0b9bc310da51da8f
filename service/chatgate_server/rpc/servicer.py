"""ChatService: proto in, domain call, proto out. No business logic lives here.

Who is calling, what a failure becomes, the span's status and the access line are the
edge's (``rpc/edge.py``); this class only converts and calls the CompletionService.
"""

from __future__ import annotations

import grpc
from opentelemetry import trace

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.access_log import note_request
from chatgate_server.completion import CompletionService, OutboundEvent
from chatgate_server.deadline import Deadline
from chatgate_server.loop_lag import NO_LAG, LoopLag
from chatgate_server.rpc import convert
from chatgate_server.rpc.edge import current_caller
from chatgate_server.rpc.tracing import trace_ids


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Serves chatgate.v1.ChatService over a CompletionService."""

    def __init__(
        self,
        service: CompletionService,
        *,
        deadline_cap_s: float,
        limits: convert.RequestLimits = convert.DEFAULT_LIMITS,
        loop_lag: LoopLag = NO_LAG,
    ) -> None:
        self._service = service
        self._limits = limits
        self._deadline_cap_s = deadline_cap_s
        self._loop_lag = loop_lag

    # A coroutine handler that writes with context.write() (grpc.aio allows both
    # forms for server streaming; the generated stub types only the generator form):
    # the CompletionService drives the loop and owns every way a call ends.
    async def Complete(  # type: ignore[override]
        self,
        request: pb.CompleteRequest,
        context: grpc.aio.ServicerContext[pb.CompleteRequest, pb.CompleteResponse],
    ) -> None:
        # One deadline for the whole call, computed before anything else.
        deadline = Deadline.start(
            context.time_remaining(), self._deadline_cap_s, loop_lag=self._loop_lag.recent()
        )
        to_proto = convert.to_proto
        write = context.write

        async def send(event: OutboundEvent) -> None:
            await write(to_proto(event))

        domain_request = convert.to_domain(request, current_caller(), self._limits)
        note_request(domain_request.request_id, domain_request.user_id, domain_request.model)
        span = trace.get_current_span()
        span.set_attribute("chatgate.request_id", domain_request.request_id)
        trace_id, span_id = trace_ids(span)
        await self._service.run(domain_request, deadline, send, trace_id=trace_id, span_id=span_id)
