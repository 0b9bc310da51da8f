"""The Python client's channel defaults: round_robin and a retry policy for UNAVAILABLE
(and CANCELLED, which gRPC's server core gives calls it never ran), replaceable or
removable by the caller (behind a mesh that balances and retries)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from chatgate.client import SERVICE_CONFIG, channel_options

Context = grpc.aio.ServicerContext[bytes, bytes]


def service_config(options: list[tuple[str, object]]) -> dict[str, object] | None:
    raw = dict(options).get("grpc.service_config")
    return None if raw is None else json.loads(str(raw))


def test_the_default_balances_round_robin_and_retries_unavailable_and_cancelled_only() -> None:
    config = service_config(channel_options(()))
    assert config == SERVICE_CONFIG
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = SERVICE_CONFIG["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert {"service": "chatgate.v1.ChatService"} in method["name"]


def test_the_service_config_can_be_replaced_or_dropped() -> None:
    mine = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})
    assert service_config(channel_options([("grpc.service_config", mine)])) == json.loads(mine)
    assert service_config(channel_options([("grpc.service_config", "")])) is None
    # Other defaults stay.
    assert dict(channel_options([("grpc.service_config", "")]))["grpc.keepalive_time_ms"] == 30_000


async def test_a_call_the_caller_cancels_is_not_retried() -> None:
    """CANCELLED is retryable for what the server's gRPC core does on shutdown; a call
    cancelled on this side must still end there, without a second attempt."""
    calls = 0
    started = asyncio.Event()

    async def complete(request: bytes, context: Context) -> AsyncIterator[bytes]:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.sleep(30)  # no event before the caller gives up
        yield b""

    server = grpc.aio.server()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_stream_rpc_method_handler(complete)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("chatgate.v1.ChatService", {"Complete": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options(())) as channel:
            complete_rpc: grpc.aio.UnaryStreamMultiCallable[bytes, bytes]
            complete_rpc = channel.unary_stream("/chatgate.v1.ChatService/Complete")
            call = complete_rpc(b"", timeout=10)
            reading = asyncio.ensure_future(call.read())
            await asyncio.wait_for(started.wait(), 5)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            await asyncio.sleep(0.5)  # a retry would have arrived by now (backoff 0.1 s)
    finally:
        await server.stop(0)
    assert calls == 1
