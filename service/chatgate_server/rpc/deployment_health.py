"""Each deployment's circuit breaker, as a gRPC health status.

``chatgate.deployment.<name>`` (the name in chatgate.toml; ``openai`` for the one made
from the environment) is SERVING while that deployment's breaker is closed or half-open
(calls, or a probe, go there) and NOT_SERVING while it is open (calls pass it over).
Set on every breaker transition; an open breaker whose cool-down has ended reads as
half-open at once, without waiting for the next call to notice. A deployment dropped by a
reload reads SERVICE_UNKNOWN. For dashboards and alerts: none of these names moves the
server's own status (``""``), which load balancers use — one failing deployment is not a
reason to take a replica out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from chatgate_server.background import stop_tasks
from chatgate_server.upstream.breaker import BreakerState, CircuitBreaker, Listener
from chatgate_server.upstream.deployment import Deployment

DEPLOYMENT_HEALTH_PREFIX = "chatgate.deployment."

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
# How often an open breaker is looked at to see its cool-down end.
_REOPEN_POLL_S = 0.5


def health_name(deployment: str) -> str:
    return f"{DEPLOYMENT_HEALTH_PREFIX}{deployment}"


class DeploymentHealth:
    """Keeps ``chatgate.deployment.<name>`` in step with the breakers it tracks."""

    def __init__(self, servicer: health.aio.HealthServicer) -> None:
        self._servicer = servicer
        self._tracked: dict[str, CircuitBreaker] = {}
        self._latest: dict[str, int] = {}
        self._applied: dict[str, int] = {}
        self._applier: asyncio.Task[None] | None = None
        self._wakers: dict[str, asyncio.Task[None]] = {}

    def track(self, deployments: Sequence[Deployment]) -> None:
        """The deployments serving now (at start, and after each reload)."""
        now = {d.name: d.breaker for d in deployments}
        for name in self._tracked.keys() - now.keys():
            self._set(name, _UNKNOWN)
        for name, breaker in now.items():
            if self._tracked.get(name) is not breaker:
                breaker.add_listener(self._listener(breaker))
        self._tracked = now
        for breaker in now.values():
            self._changed(breaker)

    def _listener(self, breaker: CircuitBreaker) -> Listener:
        def changed(_name: str, _old: BreakerState, _new: BreakerState) -> None:
            self._changed(breaker)

        return changed

    def _changed(self, breaker: CircuitBreaker) -> None:
        name = breaker.name
        if self._tracked.get(name) is not breaker:
            return  # a breaker a reload replaced: its deployment's name is another's now
        is_open = breaker.state is BreakerState.OPEN
        self._set(name, _NOT_SERVING if is_open else _SERVING)
        if is_open and name not in self._wakers:
            self._wakers[name] = asyncio.get_running_loop().create_task(
                self._wake(breaker), name=f"deployment-health-{name}"
            )

    async def _wake(self, breaker: CircuitBreaker) -> None:
        """Report the end of the cool-down (the breaker says half-open only when asked)."""
        try:
            # A poll: the breaker turns half-open by the clock, with no event to wait for.
            while self._tracked.get(breaker.name) is breaker and breaker.state is BreakerState.OPEN:  # noqa: ASYNC110
                await asyncio.sleep(_REOPEN_POLL_S)
        finally:
            self._wakers.pop(breaker.name, None)
        self._changed(breaker)

    def _set(self, name: str, status: int) -> None:
        # Called synchronously by breakers; the servicer's setter is a coroutine.
        self._latest[health_name(name)] = status
        if self._applier is None or self._applier.done():
            self._applier = asyncio.get_running_loop().create_task(self._apply(), name="deployment-health")

    async def settled(self) -> None:
        """Wait until the statuses reflect the latest states (for tests)."""
        while self._applier is not None and not self._applier.done():
            await self._applier

    async def _apply(self) -> None:
        while pending := {n: s for n, s in self._latest.items() if self._applied.get(n) != s}:
            for name, status in pending.items():
                await self._servicer.set(name, status)
                self._applied[name] = status

    async def close(self) -> None:
        await stop_tasks(*self._wakers.values(), self._applier)
        self._wakers.clear()
        self._applier = None
