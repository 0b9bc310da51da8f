"""Many health Watch streams on the plaintext health port (CHATGATE_HEALTH_LISTEN): the
per-process and per-connection caps count them together with the main port's, a flood
past them is refused with HEALTH_WATCH_LIMIT (never INTERNAL, never a hang), and every
watch given back leaves the count at zero."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatgate_server.config import ListenAddress
from tests.integration.conftest import AppFactory
from tests.integration.test_edge import details, target, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING


async def test_the_health_port_shares_the_watch_caps_and_a_flood_is_refused(start_app: AppFactory) -> None:
    app = await start_app(
        health_listen=ListenAddress("127.0.0.1", 0), max_health_watches=6, max_health_watches_per_connection=4
    )
    assert app.health_port and app.edge is not None
    health_target = f"127.0.0.1:{app.health_port}"
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with AsyncExitStack() as stack:
        main, side, flood = [
            await stack.enter_async_context(grpc.aio.insecure_channel(t, options=options))
            for t in (target(app), health_target, health_target)
        ]
        held: list[Any] = []
        for channel, count in ((main, 3), (side, 3)):
            for _ in range(count):
                call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
                assert (await call.read()).status == SERVING
                held.append(call)
        assert app.edge.watches == 6

        async def refused() -> str:
            call = health_pb2_grpc.HealthStub(flood).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            try:
                await call.read()
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name} {details(exc)[0]}"
            call.cancel()
            return "ADMITTED"

        answers = await asyncio.gather(*(refused() for _ in range(200)))
        assert set(answers) == {"RESOURCE_EXHAUSTED HEALTH_WATCH_LIMIT"}
        # A unary check still answers on the health port while the watches are full.
        check = await health_pb2_grpc.HealthStub(flood).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == SERVING
        for call in held:
            call.cancel()
        await wait_until(lambda: app.edge is not None and app.edge.watches == 0)
