"""Upstream HTTP errors are classified by their body, not the status alone."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatgate_server.errors import (
    MAX_RETRY_DELAY_S,
    RequestTooLarge,
    UpstreamCredentialsError,
    UpstreamError,
    UpstreamMisconfigured,
    UpstreamRateLimited,
    UpstreamRejected,
)
from chatgate_server.upstream.classify import (
    REJECTION_CAUSES,
    classify_http_error,
    quotable,
    retry_after_seconds,
)


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


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "1e300"}, MAX_RETRY_DELAY_S),
        ({"retry-after": "inf"}, MAX_RETRY_DELAY_S),
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "1e400"}, MAX_RETRY_DELAY_S),
        ({"retry-after-ms": "-1"}, 0.0),
        ({"retry-after-ms": "nan", "retry-after": "3"}, 3.0),  # an unreadable hint is no hint
        ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_RETRY_DELAY_S),
        ({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"}, 0.0),
    ],
)
def test_retry_after_is_clamped_to_a_sane_range(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(headers) == expected
    err = classify_http_error(429, body("requests", "rate_limit_exceeded"), headers)
    assert err.retry_after == expected  # type: ignore[attr-defined]


@given(st.dictionaries(st.sampled_from(["retry-after", "retry-after-ms"]), st.text(max_size=40)))
def test_any_retry_after_header_gives_none_or_a_bounded_delay(headers: dict[str, str]) -> None:
    seconds = retry_after_seconds(headers)
    assert seconds is None or 0.0 <= seconds <= MAX_RETRY_DELAY_S


@pytest.mark.parametrize(
    "code",
    ["sk_live_51HxYzAbCdEfGhIjKlMnOpQrStUvWxYz", "x" * 20_000, "bad code\r\nwith\x00junk"],
)
@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_rejection_never_quotes_the_upstream_code_param_or_message(code: str, status: int) -> None:
    body_ = {"error": {"type": code, "code": code, "param": code, "message": code}}
    err = classify_http_error(status, body_, {"x-request-id": code})
    assert isinstance(err, UpstreamRejected)
    assert err.cause == "OTHER"
    assert code not in err.message and "sk_" not in err.message
    assert len(err.message) < 200


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        ("context_length_exceeded", "CONTEXT_LENGTH_EXCEEDED"),
        ("model_not_found", "MODEL_NOT_FOUND"),
        ("unsupported_parameter", "UNSUPPORTED_PARAMETER"),
        ("invalid_image_url", "INVALID_IMAGE"),
        ("invalid_value", "INVALID_VALUE"),
        ("something_new", "OTHER"),
    ],
)
def test_upstream_codes_map_to_our_own_causes(code: str, cause: str) -> None:
    err = classify_http_error(400, body("invalid_request_error", code, "free text"), {})
    assert isinstance(err, UpstreamRejected)
    assert err.cause == cause and cause in REJECTION_CAUSES
    assert "free text" not in err.message


def test_billing_log_never_quotes_an_unknown_code(caplog: pytest.LogCaptureFixture) -> None:
    classify_http_error(401, body("sk_live_secret", "sk_live_secret"), {})
    assert "sk_live" not in caplog.text
    assert "type=other, code=other" in caplog.text


# What the caller reads and the operator's span records, per kind of upstream answer:
# (status, body, headers) -> (error class, message, retryable, retry_after).
_ANSWERS = [
    (
        401,
        None,
        {},
        UpstreamCredentialsError,
        "upstream credentials were rejected or the upstream billing limit is reached",
        False,
        None,
    ),
    (
        429,
        None,
        {"retry-after": "2"},
        UpstreamRateLimited,
        "the upstream is rate limiting requests",
        True,
        2.0,
    ),
    (503, None, {"retry-after": "7"}, UpstreamError, "the upstream failed (HTTP 503)", True, 7.0),
    (408, None, {"retry-after-ms": "1500"}, UpstreamError, "the upstream failed (HTTP 408)", True, 1.5),
    (409, None, {"retry-after": "3"}, UpstreamError, "the upstream failed (HTTP 409)", True, 3.0),
    (418, None, {"retry-after": "3"}, UpstreamError, "the upstream answered HTTP 418", False, None),
    (302, None, {}, UpstreamError, "the upstream answered HTTP 302", False, None),
    (
        400,
        body("invalid_request_error", "context_length_exceeded"),
        {},
        UpstreamRejected,
        "the upstream rejected the request: the messages exceed the model's context window",
        False,
        None,
    ),
    (
        404,
        body("invalid_request_error", "never_heard_of_it"),
        {},
        UpstreamRejected,
        "the upstream rejected the request as invalid",
        False,
        None,
    ),
]


@pytest.mark.parametrize(("status", "body_", "headers", "kind", "message", "retryable", "wait"), _ANSWERS)
def test_each_answer_gets_its_message_status_retry_decision_and_wait(
    status: int,
    body_: dict[str, object] | None,
    headers: dict[str, str],
    kind: type[UpstreamError],
    message: str,
    retryable: bool,
    wait: float | None,
) -> None:
    err = classify_http_error(status, body_, headers)
    assert type(err) is kind
    assert err.message == message
    assert err.http_status == status  # the span's error.type and the retry log name it
    assert err.retryable is retryable
    assert err.retry_after == wait


def test_a_request_too_large_says_why() -> None:
    err = classify_http_error(429, body("tokens", "", "Request too large for gpt-4o"), {})
    assert isinstance(err, RequestTooLarge)
    assert err.message == "the request is too large for the model's token-per-minute limit"


@pytest.mark.parametrize(
    "body_",
    [body("insufficient_quota", "something_new"), body("something_new", "billing_hard_limit_reached")],
    ids=["type-alone", "code-alone"],
)
def test_billing_is_recognised_by_type_or_code_alone(body_: dict[str, object]) -> None:
    err = classify_http_error(429, body_, {"retry-after": "1"})
    assert isinstance(err, UpstreamCredentialsError)
    assert err.retryable is False and err.http_status == 429


def test_an_upstream_that_says_do_not_retry_is_not_retried() -> None:
    err = classify_http_error(503, None, {"x-should-retry": "false"})
    assert err.retryable is False  # type: ignore[attr-defined]


def test_the_billing_log_says_none_when_type_and_code_are_absent(caplog: pytest.LogCaptureFixture) -> None:
    classify_http_error(403, {"error": {"message": "Forbidden"}}, {})
    assert "(HTTP 403, type=none, code=none)" in caplog.text


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        (None, "none"),
        ("", "none"),
        (429, "429"),
        (-999, "-999"),
        (999, "999"),
        (1000, "other"),
        (-1000, "other"),
        (True, "other"),
        (1.5, "other"),
        ("rate_limit_exceeded", "rate_limit_exceeded"),
        ("insufficient_quota", "insufficient_quota"),
        ("sk_live_abc", "other"),
    ],
)
def test_only_known_codes_and_small_numbers_are_quoted(value: object, quoted: str) -> None:
    # What reaches a mid-stream error's details and the logs: never free text.
    assert quotable(value) == quoted


# Azure's (and OpenAI's) answers that blame the deployment's configuration, as they send them.
_MISCONFIGURED = [
    (
        404,
        {
            "error": {
                "code": "DeploymentNotFound",
                "message": "The API deployment for this resource does not exist.",
            }
        },
        "DeploymentNotFound",
    ),
    (404, {"error": {"code": "404", "message": "Resource not found"}}, "Resource not found"),
    (
        400,
        {"error": {"code": "BadRequest", "message": "API version not supported"}},
        "API version not supported",
    ),
    (
        404,
        {"error": {"message": "Invalid URL (POST /v1/chat/completion)", "type": "invalid_request_error"}},
        "Invalid URL",
    ),
]


@pytest.mark.parametrize(("status", "body_", "named"), _MISCONFIGURED)
def test_a_deployments_own_misconfiguration_is_not_the_callers_mistake(
    status: int, body_: dict[str, object], named: str
) -> None:
    err = classify_http_error(status, body_, {})
    assert isinstance(err, UpstreamMisconfigured)
    assert (err.status_name, err.reason) == ("UNAVAILABLE", "UPSTREAM_MISCONFIGURED")
    assert err.deployment_fault and err.breaker_failure and not err.retryable
    assert named in err.problem  # the operator's log line says which
    assert "deployment" not in err.problem or "Azure" in err.problem
    assert err.message == "the upstream deployment is misconfigured (an operator problem, not the request's)"


def test_openais_model_not_found_stays_the_callers_mistake() -> None:
    """The caller named a model OpenAI does not serve: its 404 is INVALID_ARGUMENT, as before."""
    err = classify_http_error(
        404,
        body(
            "invalid_request_error",
            "model_not_found",
            "The model `gpt-9` does not exist or you do not have access to it.",
        ),
        {},
    )
    assert isinstance(err, UpstreamRejected) and err.cause == "MODEL_NOT_FOUND"
    assert not err.deployment_fault and not err.breaker_failure


def test_a_400_that_only_mentions_a_version_is_still_the_callers() -> None:
    err = classify_http_error(
        400, body("invalid_request_error", "invalid_value", "version must be a string"), {}
    )
    assert isinstance(err, UpstreamRejected)
