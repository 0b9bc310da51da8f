"""The Python client's reading of limits where a real server cannot easily go: a limit
kind newer than the client, and what ``waiting_helps`` says after a stream started.
(Allowances and refusals from a real server: tests/integration/test_limit_details.py.)"""

from __future__ import annotations

import grpc

from chatgate.client import ChatgateError, LimitKind, Started
from chatgate.client.events import event_from_proto
from chatgate.v1 import chat_pb2 as pb

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_limit_kind_newer_than_the_client_reads_as_unspecified() -> None:
    message = pb.CompleteResponse(
        started=pb.Started(
            request_id="r",
            model="m",
            allowances=[pb.Allowance(subject="tenant:t", kind=99, limit=5, remaining=1)],  # type: ignore[arg-type]
        )
    )
    started = event_from_proto(message)
    assert isinstance(started, Started)
    (allowance,) = started.allowances
    assert allowance.kind is LimitKind.UNSPECIFIED and str(allowance.kind) == "unspecified"
    assert (allowance.limit, allowance.remaining, allowance.resets_at) == (5, 1, None)


def test_waiting_helps_only_with_a_retry_delay_and_before_any_event() -> None:
    reason = "TOKENS_PER_MINUTE_EXCEEDED"
    assert ChatgateError(EXHAUSTED, "over", reason=reason, retry_delay=3.0).waiting_helps
    assert not ChatgateError(EXHAUSTED, "over", reason=reason).waiting_helps
    after_events = ChatgateError(EXHAUSTED, "over", reason=reason, retry_delay=3.0, events_received=2)
    assert not after_events.waiting_helps


def test_limit_exceeded_is_only_chatgates_limits() -> None:
    assert ChatgateError(EXHAUSTED, "over", reason="SPEND_PER_DAY_EXCEEDED").limit_exceeded
    # The replica's own concurrency limit is not a tenant, caller or user limit.
    assert not ChatgateError(EXHAUSTED, "busy", reason="CONCURRENCY_LIMIT", retry_delay=1.0).limit_exceeded
    assert not ChatgateError(grpc.StatusCode.PERMISSION_DENIED, "no", reason="BLOCKED").limit_exceeded
