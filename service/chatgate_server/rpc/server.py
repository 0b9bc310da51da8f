"""The grpc.aio server: ChatService, UsageService, standard health, and reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chatgate.v1 import chat_pb2_grpc, usage_pb2_grpc
from chatgate_server.rpc.edge import CHAT_SERVICE, USAGE_SERVICE, Edge
from chatgate_server.rpc.reflection import enable_reflection
from chatgate_server.rpc.servicer import ChatServicer
from chatgate_server.rpc.usage_servicer import UsageServicer

__all__ = ["CHAT_SERVICE", "USAGE_SERVICE", "build_server"]


def build_server(
    chat: ChatServicer,
    *,
    edge: Edge,
    usage: UsageServicer | None = None,
    reuse_port: bool = False,
    reflection: bool = True,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server with every service registered behind ``edge``; the caller binds a port
    and starts it.

    No ``maximum_concurrent_rpcs``: gRPC would count every call (health checks, usage
    reports, idle health watches) against it; the edge limits Complete alone. The port
    is shared (SO_REUSEPORT) only with ``reuse_port``, which only the workers of one
    supervisor set: a second server on a used port must fail, not take a share of calls.
    """
    server = grpc.aio.server(
        interceptors=(edge,),
        options=[
            # Keepalive: notice dead callers (and stop paying for their streams).
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Well above our own limit, so an oversized request reaches the edge and gets
            # INVALID_ARGUMENT naming the limit, not gRPC's bare RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", edge.limits.receive_ceiling),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    chat_pb2_grpc.add_ChatServiceServicer_to_server(chat, server)
    if usage is not None:
        usage_pb2_grpc.add_UsageServiceServicer_to_server(usage, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    if reflection:
        enable_reflection((CHAT_SERVICE, *([USAGE_SERVICE] if usage else []), health_service), server)
    return server, health_servicer
