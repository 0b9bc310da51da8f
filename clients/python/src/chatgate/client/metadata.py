"""Per-call metadata: the caller's credentials and the trace context.

The trace context (``traceparent``, plus ``tracestate``/``baggage`` when set) comes
from the current OpenTelemetry context through the globally configured propagator, so
chatgate's spans join the caller's trace. OpenTelemetry is optional: without
``opentelemetry-api`` installed (extra ``chatgate-client[otel]``) nothing is injected,
and a ``traceparent`` given explicitly in ``metadata`` always wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

MetadataPairs = Sequence[tuple[str, str]]
"""gRPC metadata: (lower-case key, ASCII value) pairs."""


def _load_injector() -> Callable[[dict[str, str]], None] | None:
    try:
        from opentelemetry.propagate import inject  # optional: the client works without it
    except ImportError:
        return None

    def inject_into(carrier: dict[str, str]) -> None:
        inject(carrier)

    return inject_into


# Looked up once: an import attempt per call would cost on the hot path.
_inject = _load_injector()


def trace_context() -> list[tuple[str, str]]:
    """The current OpenTelemetry trace context as metadata; empty without a current span."""
    if _inject is None:
        return []
    carrier: dict[str, str] = {}
    _inject(carrier)
    # gRPC metadata keys must be lower case; the W3C propagators already write them so.
    return [(key.lower(), value) for key, value in carrier.items()]


def call_metadata(
    token: str | None, client_metadata: MetadataPairs, call_metadata: MetadataPairs
) -> tuple[tuple[str, str], ...]:
    """Metadata for one call: the bearer token, fixed and per-call pairs, trace context."""
    pairs: list[tuple[str, str]] = []
    if token:
        pairs.append(("authorization", f"Bearer {token}"))
    pairs.extend(client_metadata)
    pairs.extend(call_metadata)
    if not any(key == "traceparent" for key, _ in pairs):
        pairs.extend(trace_context())
    return tuple(pairs)
