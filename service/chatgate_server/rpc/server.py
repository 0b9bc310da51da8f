"""The grpc.aio server: ChatService, UsageService, standard health, and reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chatgate.v1 import chat_pb2, chat_pb2_grpc, usage_pb2, usage_pb2_grpc
from chatgate_server.rpc.reflection import enable_reflection
from chatgate_server.rpc.servicer import ChatServicer
from chatgate_server.rpc.usage_servicer import UsageServicer

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
USAGE_SERVICE = usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name


def build_server(
    chat: ChatServicer,
    *,
    max_concurrent_streams: int,
    usage: UsageServicer | None = None,
    max_request_bytes: int = 4 * 1024 * 1024,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server with every service registered; the caller binds a port and starts it."""
    server = grpc.aio.server(
        maximum_concurrent_rpcs=max_concurrent_streams,
        options=[
            # Keepalive: notice dead callers (and stop paying for their streams).
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # A little over our own limit, so a request just past it gets our
            # INVALID_ARGUMENT with a field violation rather than gRPC's bare refusal.
            ("grpc.max_receive_message_length", max_request_bytes + 64 * 1024),
        ],
    )
    chat_pb2_grpc.add_ChatServiceServicer_to_server(chat, server)
    if usage is not None:
        usage_pb2_grpc.add_UsageServiceServicer_to_server(usage, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    enable_reflection((CHAT_SERVICE, *([USAGE_SERVICE] if usage else []), health_service), server)
    return server, health_servicer
