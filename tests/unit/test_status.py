"""Errors become gRPC statuses with rich details in exactly one place."""

from __future__ import annotations

import base64
import urllib.parse

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from chatgate_server.errors import (
    MAX_RETRY_DELAY_S,
    BreakerOpen,
    CallersUnavailable,
    ChatgateError,
    DeadlineExceeded,
    FieldViolation,
    InvalidRequest,
    QuotaExceeded,
    QuotaViolation,
    ShuttingDown,
    UpstreamCredentialsError,
    UpstreamRateLimited,
    UpstreamRejected,
)
from chatgate_server.rpc.status import MAX_MESSAGE_BYTES, to_status


def details(status: grpc.Status) -> tuple[status_pb2.Status, list[object]]:
    [raw] = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    rich = status_pb2.Status.FromString(raw)
    unpacked: list[object] = []
    for any_detail in rich.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.QuotaFailure,
        ):
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


@pytest.mark.parametrize(
    ("asked", "expected"),
    [(1e300, MAX_RETRY_DELAY_S), (float("inf"), MAX_RETRY_DELAY_S), (-5.0, 0.0), (2.5, 2.5)],
)
def test_retry_info_is_clamped_to_a_duration_a_caller_can_use(asked: float, expected: float) -> None:
    error = UpstreamRateLimited("slow down", retry_after=1.0)
    error.retry_after = asked  # even set after construction, past the constructor's clamp
    _, unpacked = details(to_status(error))
    retry = next(d for d in unpacked if isinstance(d, error_details_pb2.RetryInfo))
    assert retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9 == expected
    assert UpstreamRateLimited("slow down", retry_after=asked).retry_after == expected


def test_a_nan_retry_delay_is_left_out() -> None:
    error = UpstreamRateLimited("slow down", retry_after=float("nan"))
    assert error.retry_after is None
    error.retry_after = float("nan")
    _, unpacked = details(to_status(error))
    assert not any(isinstance(d, error_details_pb2.RetryInfo) for d in unpacked)


def trailer_bytes(status: grpc.Status) -> int:
    """What the trailers weigh on the wire, as gRPC counts them against its 8 KiB limit."""
    [raw] = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    message = urllib.parse.quote(status.details, safe=" ")  # grpc-message is percent-encoded
    return len(base64.b64encode(raw)) + len(message) + 2 * 32


@pytest.mark.parametrize("char", ["x", "\U0001f600"])
def test_a_status_always_fits_in_trailers(char: str) -> None:
    # gRPC refuses trailers over 8 KiB by default: the caller would get RESOURCE_EXHAUSTED.
    many = [FieldViolation(f"tags[{char * 64}]" + char * 500, char * 1000) for _ in range(5000)]
    status = to_status(InvalidRequest(many))
    _, unpacked = details(status)
    bad = next(d for d in unpacked if isinstance(d, error_details_pb2.BadRequest))
    assert 0 < len(bad.field_violations) < 5000
    assert trailer_bytes(status) < 7 * 1024
    long_message = to_status(ChatgateError(char * 100_000))
    assert len(long_message.details.encode()) <= MAX_MESSAGE_BYTES
    assert trailer_bytes(long_message) < 7 * 1024


def test_ordinary_violations_are_all_listed() -> None:
    many = [FieldViolation(f"messages[{i}].role", "must be one of ROLE_SYSTEM, ROLE_USER") for i in range(40)]
    _, unpacked = details(to_status(InvalidRequest(many)))
    bad = next(d for d in unpacked if isinstance(d, error_details_pb2.BadRequest))
    assert len(bad.field_violations) == 40


def test_a_rejection_names_our_cause_in_error_info() -> None:
    _, unpacked = details(to_status(UpstreamRejected("rejected", cause="MODEL_NOT_FOUND")))
    info = next(d for d in unpacked if isinstance(d, error_details_pb2.ErrorInfo))
    assert info.reason == "UPSTREAM_REJECTED_REQUEST"
    assert dict(info.metadata) == {"cause": "MODEL_NOT_FOUND"}


def test_a_limit_refusal_names_the_limit_the_subject_and_when_it_frees() -> None:
    error = QuotaExceeded(
        "user acme/u-1 is over its tokens per minute",
        reason="TOKENS_PER_MINUTE_EXCEEDED",
        violations=(QuotaViolation("user:acme/u-1", "tokens_per_minute 10000 reached"),),
        retry_after=12.5,
    )
    status = to_status(error)
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    _, unpacked = details(status)
    info, retry, quota = unpacked
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "TOKENS_PER_MINUTE_EXCEEDED"
    assert isinstance(retry, error_details_pb2.RetryInfo) and retry.retry_delay.ToMilliseconds() == 12500
    assert isinstance(quota, error_details_pb2.QuotaFailure)
    assert [(v.subject, v.description) for v in quota.violations] == [
        ("user:acme/u-1", "tokens_per_minute 10000 reached")
    ]


def test_a_spent_monthly_budget_says_no_retry_time() -> None:
    error = QuotaExceeded(
        "tenant acme spent its monthly budget",
        reason="SPEND_PER_MONTH_EXCEEDED",
        violations=(QuotaViolation("tenant:acme", "spend_per_month 5000000 reached"),),
    )
    _, unpacked = details(to_status(error))
    assert [type(d).__name__ for d in unpacked] == ["ErrorInfo", "QuotaFailure"]


def pushback(status: grpc.Status) -> str | bytes | None:
    values = [v for k, v in status.trailing_metadata if k == "grpc-retry-pushback-ms"]
    return values[0] if values else None


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # Clients retry UNAVAILABLE by their service config; the trailer steers them.
        # Upstream failures: every replica shares them and chatgate already retried.
        (UpstreamCredentialsError("our key was refused"), "-1"),
        (UpstreamRateLimited("slow down", retry_after=0.25), "-1"),
        (BreakerOpen("open", retry_after=0.5), "-1"),
        # What another replica can answer: at once, or after a short RetryInfo delay.
        (ShuttingDown("draining"), None),
        (CallersUnavailable("not loaded", retry_after=1.5), "1500"),
        (CallersUnavailable("not loaded", retry_after=30), "-1"),  # too long to hide
        (DeadlineExceeded("late"), None),  # not retried by the policy at all
    ],
)
def test_unavailable_refusals_steer_the_clients_transparent_retry(
    error: ChatgateError, expected: str | None
) -> None:
    assert pushback(to_status(error)) == expected
