"""The usage ledger's state, as gRPC health statuses.

- ``chatgate.ledger``: SERVING while usage rows go straight to Postgres; NOT_SERVING
  while Postgres is away or a spool is being replayed (rows are safe on disk but not yet
  in Postgres — alert on it), and while the ledger is full.
- ``""`` (the whole server) and ``chatgate.v1.ChatService``: NOT_SERVING while the
  ledger is full, i.e. while calls are being refused because they could not be billed,
  and while a *hold* is on — the caller table not loaded yet, so every call would be
  refused with CALLERS_UNAVAILABLE: readiness, so balancers send calls elsewhere. A
  replica that is merely spooling still serves and must stay in the load balancer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from chatgate_server.usage.ledger import LedgerState

LEDGER_HEALTH_SERVICE = "chatgate.ledger"

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class LedgerHealth:
    """A ledger state listener that keeps health statuses in step (latest state wins)."""

    def __init__(
        self, servicer: health.aio.HealthServicer, served: Sequence[str], holds: Sequence[str] = ()
    ) -> None:
        """``served``: the health names that go NOT_SERVING while the ledger is full or a
        hold is on. ``holds``: what must be ready first (released with :meth:`release`)."""
        self._servicer = servicer
        self._served = tuple(served)
        self._holds = frozenset(holds)
        self._latest: LedgerState | None = None
        self._applied: tuple[LedgerState, frozenset[str]] | None = None
        self._task: asyncio.Task[None] | None = None

    def release(self, hold: str) -> None:
        """``hold`` is ready: the served names follow the ledger alone once none is left."""
        self._holds = self._holds - {hold}
        self._poke()

    def __call__(self, state: LedgerState) -> None:
        # Called synchronously by the ledger; the servicer's setter is a coroutine.
        self._latest = state
        self._poke()

    def _poke(self) -> None:
        if self._latest is None:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._apply(), name="ledger-health")

    async def settled(self) -> None:
        """Wait until the statuses reflect the latest state (for tests and start-up)."""
        if self._task is not None:
            await self._task

    async def _apply(self) -> None:
        while self._latest is not None and (self._latest, self._holds) != self._applied:
            state, holds = self._latest, self._holds
            await self._servicer.set(
                LEDGER_HEALTH_SERVICE, _SERVING if state is LedgerState.OK else _NOT_SERVING
            )
            serving = _NOT_SERVING if state is LedgerState.FULL or holds else _SERVING
            for name in self._served:
                await self._servicer.set(name, serving)
            self._applied = (state, holds)
