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

log = logging.getLogger(__name__)


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Serves chatgate.v1.ChatService over a CompletionService."""

    def __init__(self, service: CompletionService, *, deadline_cap_s: float) -> None:
        self._service = service
        self._deadline_cap_s = deadline_cap_s

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

        try:
            domain_request = convert.to_domain(request, ANONYMOUS_CALLER)
            await self._service.run(domain_request, deadline, send)
        except ChatgateError as exc:
            await context.abort_with_status(to_status(exc))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error in Complete")
            await context.abort_with_status(to_status(ChatgateError("internal error")))
