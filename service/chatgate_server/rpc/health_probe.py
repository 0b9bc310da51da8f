"""The client side of ``chatgate health``: ask a running server's health service.

Here because only ``rpc/`` talks gRPC. Each name is asked separately: ``""`` is the
whole server (NOT_SERVING while draining or while the ledger is full: readiness),
``chatgate.ledger`` the usage ledger (NOT_SERVING while rows wait in the spool: alert on
it) and ``chatgate.liveness`` only that the process answers (SERVING from start until
shutdown, whatever Postgres does: liveness, since a restart brings no database back and
must not lose what the ledger holds). ``chatgate.deployment.<name>`` is one upstream
deployment's breaker (``deployment_health.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatgate_server.rpc.ledger_health import LEDGER_HEALTH_SERVICE

__all__ = ["LEDGER_HEALTH_SERVICE", "LIVENESS_SERVICE", "probe"]

LIVENESS_SERVICE = "chatgate.liveness"


def probe(address: str, services: Sequence[str], timeout: float) -> list[tuple[str, str]]:
    """(service, status name) for each of ``services``; a failed call's status is its
    gRPC code name (``UNAVAILABLE`` when nothing listens, ``NOT_FOUND`` for an unknown name)."""
    answers: list[tuple[str, str]] = []
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                status = exc.code().name
            answers.append((service, status))
    return answers
