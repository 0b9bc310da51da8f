"""The health names the Kubernetes probes ask are ones a real server answers."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatgate_server.app import App
from tests.kubernetes import container, rendered


def probe_names() -> dict[str, str]:
    objects = rendered("base")
    chatgate = container(objects.one("Deployment", "chatgate")["spec"]["template"], "chatgate")
    return {
        probe: chatgate[probe]["grpc"]["service"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }


async def test_every_probe_name_of_the_manifests_is_serving_on_a_started_server(app: App) -> None:
    names = probe_names()
    assert names["livenessProbe"] == "chatgate.liveness"  # never the ledger's name or ""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for probe, name in names.items():
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (probe, name)
