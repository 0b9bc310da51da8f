"""The grpc.aio server: ChatService, UsageService, standard health, and reflection."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chatgate.v1 import chat_pb2_grpc, usage_pb2_grpc
from chatgate_server.rpc.edge import CHAT_SERVICE, USAGE_SERVICE, Edge
from chatgate_server.rpc.reflection import enable_reflection
from chatgate_server.rpc.servicer import ChatServicer
from chatgate_server.rpc.usage_servicer import UsageServicer

__all__ = ["CHAT_SERVICE", "USAGE_SERVICE", "ConnectionAge", "build_health_server", "build_server"]


@dataclass(frozen=True, slots=True)
class ConnectionAge:
    """How long a client connection lives before the server asks it to go (GOAWAY).

    HTTP/2 pins a client to the replica it first connected to; a GOAWAY makes it
    reconnect (re-resolving DNS), so new replicas get their share. gRPC core spreads
    the age by ±10 % so the connections of one burst do not all leave together. Streams
    running on the connection then have ``grace_s`` to finish before it is closed.
    """

    age_s: float | None
    """None: connections are never recycled."""
    grace_s: float

    def options(self) -> list[tuple[str, int]]:
        if self.age_s is None:
            return []
        return [
            ("grpc.max_connection_age_ms", max(1, round(self.age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", round(self.grace_s * 1000)),
        ]


def build_server(
    chat: ChatServicer,
    *,
    edge: Edge,
    usage: UsageServicer | None = None,
    reuse_port: bool = False,
    reflection: bool = True,
    connection_age: ConnectionAge | None = None,
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
            *(connection_age.options() if connection_age is not None else []),
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


def build_health_server(
    servicer: health.aio.HealthServicer, *, edge: Edge, reuse_port: bool = False
) -> grpc.aio.Server:
    """A second server with the main one's health servicer and nothing else, for a
    plaintext port: kubelet's gRPC probes cannot present a client certificate, so under
    mTLS they need a port without it, and that port must not carry any other service.
    Behind the same edge, so its Watch streams count against the same limits."""
    server = grpc.aio.server(
        interceptors=(edge,),
        options=[("grpc.so_reuseport", 1 if reuse_port else 0)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server
