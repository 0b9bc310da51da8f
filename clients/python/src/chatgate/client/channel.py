"""Channel options and construction shared by the sync and async clients."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc

ChannelOptions = Sequence[tuple[str, Any]]
"""grpc channel arguments, e.g. ``[("grpc.max_receive_message_length", 8 << 20)]``."""


def _version() -> str:
    try:
        return metadata.version("chatgate-client")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0"


SERVICE_CONFIG: dict[str, Any] = {
    # Spread calls over every address the name resolves to (a Kubernetes headless
    # Service gives one per pod). gRPC's default, pick_first, would pin the whole client
    # to one replica for the life of its connection.
    "loadBalancingConfig": [{"round_robin": {}}],
    # No client-side health checks ("healthCheckConfig"): each would hold a health Watch
    # per replica, and a replica past CHATGATE_MAX_HEALTH_WATCHES refuses one, which
    # gRPC takes for "replica down" — a large fleet of clients would see healthy
    # replicas as down. A draining replica refuses new calls instead, and the retry
    # below sends them elsewhere.
    "methodConfig": [
        {
            "name": [{"service": "chatgate.v1.ChatService"}, {"service": "chatgate.v1.UsageService"}],
            # gRPC retries a call only while nothing of its response has arrived (for a
            # stream: no event yet): exactly the rule "retry UNAVAILABLE before any
            # event". A retry picks a replica afresh, so a call refused by one that is
            # draining, or cut by a replica that died, is answered by another. The
            # server steers it with grpc-retry-pushback-ms (never for its own key's
            # failure; RetryInfo's wait when short). CANCELLED too: gRPC's server core
            # cancels the calls it had received but not yet handed to chatgate when a
            # replica stops (grpc/grpc#41785), so such a call never ran; chatgate itself
            # never ends a call with CANCELLED, and a call this client cancels is not
            # retried.
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ],
}
"""The default service config: round_robin, and the retry policy. Replace it with
``options=[("grpc.service_config", json.dumps(...))]``, or turn it off with
``("grpc.service_config", "")`` (e.g. behind a mesh or Envoy that balances and retries
itself)."""

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
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    # Room to replay a request on retry: gRPC stops retrying a call whose request
    # outgrew this buffer (256 KiB by default; chatgate takes up to 4 MiB).
    ("grpc.per_rpc_retry_buffer_size", 8 << 20),
)


def channel_options(extra: ChannelOptions) -> list[tuple[str, Any]]:
    """The default options with ``extra`` applied on top (an extra key replaces a default;
    ``("grpc.service_config", "")`` drops the default service config)."""
    merged = dict(DEFAULT_OPTIONS)
    merged.update(extra)
    if merged.get("grpc.service_config") == "":
        del merged["grpc.service_config"]
    return list(merged.items())


PathLike = str | os.PathLike[str]


def tls_credentials(
    *, ca_file: PathLike | None = None, cert_file: PathLike | None = None, key_file: PathLike | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: ``ca_file`` to trust (default: the system's
    roots), and a client certificate and key for mTLS (both or neither)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together (a client certificate and its key)")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file is not None else None,
        private_key=Path(key_file).read_bytes() if key_file is not None else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file is not None else None,
    )


def resolve_token(token: str | None, token_file: PathLike | None) -> str | None:
    """The bearer token given, or the one in ``token_file`` (read once, whitespace
    stripped: a file written by ``chatgate callers create > token`` ends in a newline)."""
    if token is not None and token_file is not None:
        raise ValueError("give token or token_file, not both")
    if token_file is None:
        return token
    text = Path(token_file).read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{token_file} is empty")
    return text


def resolve_credentials(
    credentials: grpc.ChannelCredentials | None,
    ca_file: PathLike | None,
    cert_file: PathLike | None,
    key_file: PathLike | None,
) -> grpc.ChannelCredentials | None:
    """``credentials`` as given, or made from the TLS files when any is named."""
    if ca_file is None and cert_file is None and key_file is None:
        return credentials
    if credentials is not None:
        raise ValueError("give credentials or the TLS files (ca_file, cert_file, key_file), not both")
    return tls_credentials(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
