"""Errors become gRPC statuses with rich details in exactly one place."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from chatgate_server.errors import (
    BreakerOpen,
    ChatgateError,
    DeadlineExceeded,
    FieldViolation,
    InvalidRequest,
    UpstreamCredentialsError,
)
from chatgate_server.rpc.status import to_status


def details(status: grpc.Status) -> tuple[status_pb2.Status, list[object]]:
    [raw] = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    rich = status_pb2.Status.FromString(raw)
    unpacked: list[object] = []
    for any_detail in rich.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo, error_details_pb2.BadRequest):
            msg = cls()
            if any_detail.Unpack(msg):
                unpacked.append(msg)
    return rich, unpacked


def test_invalid_request_has_field_violations_and_a_reason() -> None:
    status = to_status(
        InvalidRequest([FieldViolation("user_id", "required"), FieldViolation("top_p", "range")])
    )
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    rich, unpacked = details(status)
    info = next(d for d in unpacked if isinstance(d, error_details_pb2.ErrorInfo))
    assert (info.reason, info.domain) == ("INVALID_REQUEST", "chatgate")
    bad = next(d for d in unpacked if isinstance(d, error_details_pb2.BadRequest))
    assert [v.field for v in bad.field_violations] == ["user_id", "top_p"]
    assert "user_id" in rich.message


def test_breaker_open_says_when_to_come_back() -> None:
    status = to_status(BreakerOpen("paused", retry_after=12.25))
    assert status.code == grpc.StatusCode.UNAVAILABLE
    _, unpacked = details(status)
    retry = next(d for d in unpacked if isinstance(d, error_details_pb2.RetryInfo))
    assert retry.retry_delay.seconds == 12 and retry.retry_delay.nanos == 250_000_000


def test_codes_by_meaning() -> None:
    assert to_status(DeadlineExceeded("late")).code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert to_status(UpstreamCredentialsError("upstream credentials")).code == grpc.StatusCode.UNAVAILABLE


def test_unexpected_exceptions_become_a_generic_internal() -> None:
    status = to_status(RuntimeError("secret detail sk-live-123 at /srv/app.py line 9"))
    assert status.code == grpc.StatusCode.INTERNAL
    assert status.details == "internal error"
    rich, _ = details(status)
    assert "sk-live" not in rich.SerializeToString().decode("latin-1")
    assert isinstance(ChatgateError("x"), Exception)
