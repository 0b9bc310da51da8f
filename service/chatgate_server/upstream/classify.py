"""An upstream HTTP error response → the right :class:`UpstreamError`.

Classification reads the error body's ``type``/``code``, not the status alone: a 429
can be a passing rate limit (retry), an exhausted quota or billing limit (never
retry; an operator problem) or a request that is too large (never succeeds).
Messages are ours: the upstream's text never reaches the caller, and neither does
anything that could contain the key.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Mapping
from typing import Any

from chatgate_server.errors import (
    RequestTooLarge,
    UpstreamCredentialsError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
)

# Codes OpenAI uses when our organisation/project cannot pay for more.
log = logging.getLogger(__name__)

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


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait the upstream asked for: ``retry-after-ms``, then ``retry-after``."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # neither seconds nor an HTTP date: ignore it
    return max(parsed.timestamp() - (time.time() if now is None else now), 0.0)


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
            "upstream refused our credentials or billing (HTTP %d, type=%s, code=%s)", status, etype, code
        )
        return UpstreamCredentialsError(
            "upstream credentials were rejected or the upstream billing limit is reached", http_status=status
        )
    if status == 429 and "request too large" in text.lower():
        return RequestTooLarge("the request is too large for the model's token-per-minute limit")
    if status in (400, 404, 422):
        detail = f" ({code})" if code and code.isidentifier() else ""
        error: UpstreamError = UpstreamRejected(
            f"the upstream rejected the request as invalid{detail}", http_status=status
        )
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
