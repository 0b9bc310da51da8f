"""Channel options and construction shared by the sync and async clients."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import Any

ChannelOptions = Sequence[tuple[str, Any]]
"""grpc channel arguments, e.g. ``[("grpc.max_receive_message_length", 8 << 20)]``."""


def _version() -> str:
    try:
        return metadata.version("chatgate-client")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0"


DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Ping the connection every 30 s and drop it when a ping goes 10 s unanswered:
    # a dead peer, or a NAT/load balancer that silently forgot the connection, is then
    # noticed within ~40 s instead of the next call hanging on a half-open socket.
    # chatgate permits pings every 10 s, so this never earns a GOAWAY(too_many_pings).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A stream can stay silent for long (a model thinking before its first token);
    # keep pinging through it (gRPC's default stops after 2 pings without data).
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect promptly after a server restart (gRPC's default starts at 1 s anyway,
    # but caps the backoff at 120 s; 10 s keeps a rolling deploy from stalling callers).
    ("grpc.max_reconnect_backoff_ms", 10_000),
    ("grpc.primary_user_agent", f"chatgate-client-python/{_version()}"),
)


def channel_options(extra: ChannelOptions) -> list[tuple[str, Any]]:
    """The default options with ``extra`` applied on top (an extra key replaces a default)."""
    merged = dict(DEFAULT_OPTIONS)
    merged.update(extra)
    return list(merged.items())
