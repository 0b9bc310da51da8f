"""Small rules the sync and async clients share: deadlines and the broken-stream error."""

from __future__ import annotations

import math

import grpc

from chatgate.client.errors import ChatgateError
from chatgate.client.result import Collector

DEFAULT_TIMEOUT = 60.0
"""Seconds: chatgate's own default cap. Pick a shorter one per use case (docs/CALLING.md)."""


def check_timeout(timeout: float | None) -> float | None:
    """``timeout`` if it is a usable deadline; ValueError for zero, negative or NaN."""
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return timeout


def incomplete_stream(collector: Collector) -> ChatgateError:
    """The error for a stream that ended with OK but no final event (a contract breach)."""
    error = ChatgateError(
        grpc.StatusCode.UNKNOWN,
        "the stream ended without its final event",
        reason="INCOMPLETE_STREAM",
        events_received=collector.events,
    )
    error.partial = collector.result()
    return error
