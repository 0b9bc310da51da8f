"""The Python client's channel defaults: round_robin and a retry policy for UNAVAILABLE,
replaceable or removable by the caller (behind a mesh that balances and retries)."""

from __future__ import annotations

import json

from chatgate.client import SERVICE_CONFIG, channel_options


def service_config(options: list[tuple[str, object]]) -> dict[str, object] | None:
    raw = dict(options).get("grpc.service_config")
    return None if raw is None else json.loads(str(raw))


def test_the_default_balances_round_robin_and_retries_unavailable_only() -> None:
    config = service_config(channel_options(()))
    assert config == SERVICE_CONFIG
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = SERVICE_CONFIG["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert {"service": "chatgate.v1.ChatService"} in method["name"]


def test_the_service_config_can_be_replaced_or_dropped() -> None:
    mine = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})
    assert service_config(channel_options([("grpc.service_config", mine)])) == json.loads(mine)
    assert service_config(channel_options([("grpc.service_config", "")])) is None
    # Other defaults stay.
    assert dict(channel_options([("grpc.service_config", "")]))["grpc.keepalive_time_ms"] == 30_000
