"""Upstream HTTP errors are classified by their body, not the status alone."""

from __future__ import annotations

import email.utils

import pytest

from chatgate_server.errors import (
    RequestTooLarge,
    UpstreamCredentialsError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
)
from chatgate_server.upstream.classify import classify_http_error, retry_after_seconds


def body(etype: str = "", code: str = "", message: str = "") -> dict[str, object]:
    return {"error": {"type": etype, "code": code, "message": message, "param": None}}


def test_a_passing_rate_limit_is_retryable_and_carries_the_wait() -> None:
    err = classify_http_error(
        429,
        body("requests", "rate_limit_exceeded", "Please try again in 644ms."),
        {"retry-after-ms": "644"},
    )
    assert isinstance(err, UpstreamRateLimited)
    assert err.retryable and err.breaker_failure
    assert err.retry_after == pytest.approx(0.644)


@pytest.mark.parametrize(
    "code",
    [
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
    ],
)
def test_billing_429s_are_operator_problems_never_retried(code: str) -> None:
    err = classify_http_error(429, body("insufficient_quota", code, "You exceeded your current quota"), {})
    assert isinstance(err, UpstreamCredentialsError)
    assert not err.retryable and not err.breaker_failure
    assert "quota" not in err.message.lower() or "upstream" in err.message


def test_request_too_large_is_never_retried() -> None:
    err = classify_http_error(
        429,
        body(
            "tokens", "rate_limit_exceeded", "Request too large for gpt-4o ... Limit 30000, Requested 45000."
        ),
        {},
    )
    assert isinstance(err, RequestTooLarge)


@pytest.mark.parametrize("status", [400, 404, 422])
def test_caller_mistakes(status: int) -> None:
    err = classify_http_error(status, body("invalid_request_error", "model_not_found"), {})
    assert isinstance(err, UpstreamRejected)
    assert not err.retryable and not err.breaker_failure
    assert err.status_name == "INVALID_ARGUMENT"


@pytest.mark.parametrize("status", [401, 403])
def test_our_key_rejected(status: int) -> None:
    err = classify_http_error(
        status, body("invalid_request_error", "invalid_api_key", "Incorrect API key provided: sk-abc***"), {}
    )
    assert isinstance(err, UpstreamCredentialsError)
    assert "sk-" not in err.message and "Incorrect" not in err.message


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504])
def test_transient_failures_are_retryable(status: int) -> None:
    err = classify_http_error(status, None, {})
    assert isinstance(err, UpstreamError)
    assert err.retryable and err.breaker_failure


def test_x_should_retry_overrides_the_status() -> None:
    no = classify_http_error(500, None, {"x-should-retry": "false"})
    yes = classify_http_error(400, None, {"x-should-retry": "true"})
    assert isinstance(no, UpstreamError) and not no.retryable
    assert isinstance(yes, UpstreamError) and yes.retryable


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    when = email.utils.formatdate(1_000_010, usegmt=True)
    assert retry_after_seconds({"retry-after": when}, now=1_000_000) == pytest.approx(10)
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
