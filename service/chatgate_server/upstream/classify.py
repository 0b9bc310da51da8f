"""An upstream HTTP error response → the right :class:`UpstreamError`.

Classification reads the error body's ``type``/``code``, not the status alone: a 429
can be a passing rate limit (retry), an exhausted quota or billing limit (never
retry; an operator problem) or a request that is too large (never succeeds); a 404 or
400 is the caller's mistake (the model it named does not exist) unless the body says
the deployment itself is configured wrong (Azure: no such deployment, no such URL, an
api-version the resource does not serve; OpenAI: no such URL) — then no request could
succeed there, and the call belongs on another deployment.
Messages are ours: the upstream's text never reaches the caller, and neither does
anything that could contain the key. Its ``code``, ``type``, ``param`` and ``message``
are free text of any length (a code once held a live key; another was 20,000
characters): they are looked up in fixed vocabularies, never echoed, not even to logs.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from chatgate_server.errors import (
    RequestTooLarge,
    UpstreamCredentialsError,
    UpstreamError,
    UpstreamMisconfigured,
    UpstreamRateLimited,
    UpstreamRejected,
    sane_retry_delay,
)

log = logging.getLogger(__name__)

# Codes OpenAI uses when our organisation/project cannot pay for more.
_BILLING_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "billing_hard_limit_reached",
        "billing_not_active",
        "access_terminated",
    }
)

# A rejected request's upstream code → our cause (ErrorInfo metadata "cause") and the
# words the caller reads. Anything else is OTHER.
_REJECTION_CAUSES: dict[str, str] = {
    "context_length_exceeded": "CONTEXT_LENGTH_EXCEEDED",
    "string_above_max_length": "VALUE_TOO_LONG",
    "array_above_max_length": "VALUE_TOO_LONG",
    "model_not_found": "MODEL_NOT_FOUND",
    "unsupported_parameter": "UNSUPPORTED_PARAMETER",
    "unsupported_value": "UNSUPPORTED_PARAMETER",
    "invalid_image_url": "INVALID_IMAGE",
    "invalid_image_format": "INVALID_IMAGE",
    "invalid_image": "INVALID_IMAGE",
    "image_parse_error": "INVALID_IMAGE",
    "image_too_large": "INVALID_IMAGE",
    "invalid_function_parameters": "INVALID_TOOL_SCHEMA",
    "content_policy_violation": "CONTENT_POLICY",
    "content_filter": "CONTENT_POLICY",
    "invalid_value": "INVALID_VALUE",
    "invalid_type": "INVALID_VALUE",
    "missing_required_parameter": "INVALID_VALUE",
    "integer_above_max_value": "INVALID_VALUE",
    "integer_below_min_value": "INVALID_VALUE",
    "decimal_above_max_value": "INVALID_VALUE",
    "decimal_below_min_value": "INVALID_VALUE",
    "empty_array": "INVALID_VALUE",
}
_CAUSE_TEXT: dict[str, str] = {
    "CONTEXT_LENGTH_EXCEEDED": "the messages exceed the model's context window",
    "VALUE_TOO_LONG": "a text or list in the request is longer than the model accepts",
    "MODEL_NOT_FOUND": "the model does not exist or is not available to this service",
    "UNSUPPORTED_PARAMETER": "the model does not support a parameter or value of the request",
    "INVALID_IMAGE": "an image could not be fetched or read",
    "INVALID_TOOL_SCHEMA": "a tool's parameters are not a schema the model accepts",
    "CONTENT_POLICY": "the request was refused by the upstream's content policy",
    "INVALID_VALUE": "a parameter has a value the model does not accept",
    "OTHER": "the upstream rejected the request as invalid",
}
REJECTION_CAUSES = frozenset(_CAUSE_TEXT)

# The error types and codes that may be quoted (mid-stream error events, logs).
_QUOTABLE = frozenset(
    {
        "server_error",
        "internal_error",
        "invalid_request_error",
        "api_error",
        "rate_limit_exceeded",
        "rate_limit_error",
        "requests",
        "tokens",
        "overloaded_error",
        "timeout",
        "slow_down",
        *_BILLING_CODES,
        *_REJECTION_CAUSES,
    }
)


def quotable(value: Any) -> str:
    """An upstream error type or code as we may repeat it: itself when it is one we
    know, ``none`` when absent, ``other`` for anything else."""
    if value is None or value == "":
        return "none"
    if type(value) is int and -1000 < value < 1000:
        return str(value)
    return value if type(value) is str and value in _QUOTABLE else "other"


def _seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return None if math.isnan(seconds) else seconds


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait the upstream asked for: ``retry-after-ms``, then ``retry-after``;
    clamped to ``[0, MAX_RETRY_DELAY_S]``, None when absent or unreadable."""
    ms = _seconds(headers.get("retry-after-ms"))
    if ms is not None:
        return sane_retry_delay(ms / 1000.0)
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return sane_retry_delay(seconds)
    try:
        parsed = email.utils.parsedate_to_datetime(value)
        # Before 1970 on some platforms, or a naive time outside the local calendar.
        wait = parsed.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None  # neither seconds nor an HTTP date: ignore it
    return sane_retry_delay(wait)


def misconfiguration(status: int, code: str, text: str) -> str | None:
    """What is wrong with the deployment's configuration, when the upstream's answer says
    it is the URL, the deployment name or the api-version, not the request: a fixed
    phrase for logs, or None."""
    lowered = text.lower()
    if status == 404 and code == "DeploymentNotFound":
        return "its Azure deployment name does not exist on the resource (DeploymentNotFound)"
    if status == 404 and lowered.startswith("resource not found"):
        return "the resource has no such URL (Resource not found: a wrong path or a missing api-version)"
    if status == 400 and "api version not supported" in lowered:
        return "the resource does not serve its api_version (API version not supported)"
    if status == 404 and lowered.startswith("invalid url"):
        return "the upstream has no such URL (Invalid URL: a wrong base_url)"
    return None


def _rejection(status: int, code: str) -> UpstreamRejected:
    cause = _REJECTION_CAUSES.get(code, "OTHER")
    text = _CAUSE_TEXT[cause]
    if cause != "OTHER":
        text = f"the upstream rejected the request: {text}"
    return UpstreamRejected(text, cause=cause, http_status=status)


def model_not_found(status: int | None) -> UpstreamRejected:
    """The caller named a model the upstream does not have (as OpenAI's model_not_found)."""
    return _rejection(status or 404, "model_not_found")


def classify_http_error(status: int, body: Mapping[str, Any] | None, headers: Mapping[str, str]) -> Exception:
    """The error to raise for a non-200 upstream response."""
    err = body.get("error") if isinstance(body, Mapping) else None
    err = err if isinstance(err, Mapping) else {}
    etype = str(err.get("type") or "")
    code = str(err.get("code") or "")
    text = str(err.get("message") or "")
    retry_after = retry_after_seconds(headers)
    should_retry = headers.get("x-should-retry")

    if status in (401, 403) or etype in _BILLING_CODES or code in _BILLING_CODES:
        # An operator problem: say so loudly here, and only briefly to the caller.
        log.error(
            "upstream refused our credentials or billing (HTTP %d, type=%s, code=%s)",
            status,
            quotable(etype),
            quotable(code),
        )
        return UpstreamCredentialsError(
            "upstream credentials were rejected or the upstream billing limit is reached", http_status=status
        )
    if status == 429 and "request too large" in text.lower():
        return RequestTooLarge("the request is too large for the model's token-per-minute limit")
    problem = misconfiguration(status, code, text)
    if problem is not None:
        return UpstreamMisconfigured(
            "the upstream deployment is misconfigured (an operator problem, not the request's)",
            problem=problem,
            http_status=status,
            names_deployment=code == "DeploymentNotFound",
        )
    if status in (400, 404, 422):
        error: UpstreamError = _rejection(status, code)
    elif status == 429:
        error = UpstreamRateLimited(
            "the upstream is rate limiting requests", retry_after=retry_after, http_status=status
        )
    elif status in (408, 409) or status >= 500:
        error = UpstreamError(
            f"the upstream failed (HTTP {status})", retry_after=retry_after, http_status=status
        )
    else:
        error = UpstreamError(f"the upstream answered HTTP {status}", http_status=status, retryable=False)
    # The upstream's own hint wins over our status-based guess.
    if should_retry == "true":
        error.retryable = True
    elif should_retry == "false":
        error.retryable = False
    return error
