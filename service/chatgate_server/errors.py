"""Every error chatgate raises on purpose, in one tree.

    ChatgateError                       (INTERNAL)
    ├── InvalidRequest                  INVALID_ARGUMENT, with field violations
    ├── RequestTooLarge                 INVALID_ARGUMENT
    ├── DuplicateRequest                ALREADY_EXISTS
    ├── Overloaded                      RESOURCE_EXHAUSTED, with RetryInfo (a limit of this replica)
    │   ├── TooManyStreams              (CHATGATE_MAX_CONCURRENT_STREAMS completions running)
    │   ├── RequestBytesInFlight        (CHATGATE_MAX_REQUEST_MB_IN_FLIGHT of requests held)
    │   └── TooManyHealthWatches        (health Watch streams, globally or on one connection)
    ├── Unauthenticated                 UNAUTHENTICATED
    │   ├── CredentialMissing           (no authorization metadata / client certificate)
    │   ├── CredentialInvalid           (malformed, or names no known credential)
    │   ├── CredentialRevoked
    │   └── CredentialExpired           (expired, or rotated out after its grace)
    ├── QuotaExceeded                   RESOURCE_EXHAUSTED, with QuotaFailure (+ RetryInfo when waiting helps)
    ├── PermissionDenied                PERMISSION_DENIED
    │   └── Blocked                     (a tenant, caller or user blocked by an operator or the detector)
    ├── DeadlineExceeded                DEADLINE_EXCEEDED
    ├── ServiceUnavailable              UNAVAILABLE (ledger full)
    │   ├── ShuttingDown                UNAVAILABLE (draining; retry on another replica)
    │   └── LedgerFull                  UNAVAILABLE (Postgres away and the usage spool full)
    └── UpstreamError                   UNAVAILABLE
        ├── UpstreamRateLimited         UNAVAILABLE, with RetryInfo
        ├── UpstreamCredentialsError    UNAVAILABLE ("upstream credentials")
        ├── UpstreamMisconfigured       UNAVAILABLE (a deployment's name or api-version is wrong)
        ├── UpstreamRejected            INVALID_ARGUMENT (the upstream called the request bad)
        ├── UpstreamProtocolError       UNAVAILABLE (malformed stream)
        └── BreakerOpen                 UNAVAILABLE, with RetryInfo

Each class knows its gRPC status by name (a plain string, so this module needs no
grpc import); ``rpc/status.py`` is the one place that turns an error into a status
with rich details. Messages are written for the caller: they never carry an upstream
body, a key or a stack trace.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

# The longest wait a RetryInfo ever states. Upstream hints are clamped to it: a
# `retry-after: 1e300` must not overflow a Duration, and a caller is better served
# asking again in an hour than told to wait for a day.
MAX_RETRY_DELAY_S = 3600.0


def sane_retry_delay(seconds: float | None) -> float | None:
    """``seconds`` as a delay we can state: None when unknown or NaN, else in
    ``[0, MAX_RETRY_DELAY_S]`` (infinities included)."""
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_DELAY_S)


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: a path like ``messages[2].role`` and why."""

    field: str
    description: str


class ChatgateError(Exception):
    """Root of chatgate's errors. ``reason`` is a stable UPPER_SNAKE code for ErrorInfo."""

    status_name = "INTERNAL"
    reason = "INTERNAL"
    # Extra ErrorInfo metadata: our own words only, from a fixed vocabulary.
    metadata: Mapping[str, str] = {}

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Seconds until a retry may succeed; becomes RetryInfo.
        self.retry_after = sane_retry_delay(retry_after)


class InvalidRequest(ChatgateError):
    status_name = "INVALID_ARGUMENT"
    reason = "INVALID_REQUEST"

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:3])
        more = f" (and {len(violations) - 3} more)" if len(violations) > 3 else ""
        super().__init__(f"invalid request: {summary}{more}")
        self.violations = violations


class RequestTooLarge(ChatgateError):
    status_name = "INVALID_ARGUMENT"
    reason = "REQUEST_TOO_LARGE"


class DuplicateRequest(ChatgateError):
    status_name = "ALREADY_EXISTS"
    reason = "DUPLICATE_REQUEST_ID"


class Unauthenticated(ChatgateError):
    """The call proved no caller; the message never repeats what was presented."""

    status_name = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class CredentialMissing(Unauthenticated):
    reason = "CREDENTIAL_MISSING"


class CredentialInvalid(Unauthenticated):
    reason = "CREDENTIAL_INVALID"


class CredentialRevoked(Unauthenticated):
    reason = "CREDENTIAL_REVOKED"


class CredentialExpired(Unauthenticated):
    reason = "CREDENTIAL_EXPIRED"


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One limit a call would exceed: whose (``tenant:acme``, ``caller:billing``,
    ``user:acme/u-42``, optionally ``…/model:gpt-4o``) and which, in words."""

    subject: str
    description: str


class QuotaExceeded(ChatgateError):
    """A limit refused the call (limits/). ``reason`` names the limit kind, one of
    :attr:`reasons` (``<LimitKind value in upper case>_EXCEEDED``); ``violations``
    become a QuotaFailure; ``retry_after`` is when the call would fit — None when
    waiting does not help within the hour (a monthly budget spent)."""

    status_name = "RESOURCE_EXHAUSTED"
    reason = "QUOTA_EXCEEDED"
    # Every reason an instance may carry, one per LimitKind. Declared here, not left to
    # each raise site, so callers' docs and client types can be checked against it
    # (tests/unit/test_error_reasons.py) and a misspelt reason fails at once.
    reasons: ClassVar[frozenset[str]] = frozenset(
        {
            "REQUESTS_PER_MINUTE_EXCEEDED",
            "TOKENS_PER_MINUTE_EXCEEDED",
            "TOKENS_PER_DAY_EXCEEDED",
            "SPEND_PER_DAY_EXCEEDED",
            "SPEND_PER_MONTH_EXCEEDED",
            "CONCURRENT_STREAMS_EXCEEDED",
        }
    )

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        violations: tuple[QuotaViolation, ...],
        retry_after: float | None = None,
    ) -> None:
        if reason not in self.reasons:
            raise ValueError(f"not a limit reason: {reason!r} (QuotaExceeded.reasons)")
        super().__init__(message, retry_after=retry_after)
        self.reason = reason
        self.violations = violations


class PermissionDenied(ChatgateError):
    """The caller is known but may not do this (a model outside its allow-list, a role it
    lacks)."""

    status_name = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class Blocked(PermissionDenied):
    """The tenant, caller or user is blocked (``chatgate block``, or the abuse
    detector's escalation); the message gives the recorded reason."""

    reason = "BLOCKED"


class Overloaded(ChatgateError):
    """This replica is at one of its limits: the call was refused before any work, and
    the same call may succeed shortly (always with RetryInfo, so clients know to retry)."""

    status_name = "RESOURCE_EXHAUSTED"
    reason = "OVERLOADED"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class TooManyStreams(Overloaded):
    reason = "CONCURRENCY_LIMIT"


class RequestBytesInFlight(Overloaded):
    reason = "REQUEST_BYTES_LIMIT"


class TooManyHealthWatches(Overloaded):
    reason = "HEALTH_WATCH_LIMIT"


class DeadlineExceeded(ChatgateError):
    status_name = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_EXCEEDED"


class ServiceUnavailable(ChatgateError):
    status_name = "UNAVAILABLE"
    reason = "SERVICE_UNAVAILABLE"


class CallersUnavailable(ServiceUnavailable):
    """The caller table has not loaded yet (Postgres away since start-up): nobody can be
    authenticated, so every call is refused — authentication fails closed."""

    reason = "CALLERS_UNAVAILABLE"


class ShuttingDown(ServiceUnavailable):
    """This replica is draining: new calls are refused, calls past the grace period cut."""

    reason = "SHUTTING_DOWN"


class LedgerFull(ServiceUnavailable):
    """Usage rows can go neither to Postgres nor to the spool: calls that could not be
    billed are refused."""

    reason = "USAGE_LEDGER_FULL"


class UpstreamError(ChatgateError):
    """The upstream failed. ``retryable`` says whether another attempt may succeed."""

    status_name = "UNAVAILABLE"
    reason = "UPSTREAM_UNAVAILABLE"
    retryable = True
    # Counts toward opening the breaker (caller mistakes and our own key never do).
    breaker_failure = True
    # The fault is the deployment's own (its key, billing, configuration), not the
    # request's: another deployment may serve the call even though this one never will.
    deployment_fault = False

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        http_status: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.http_status = http_status
        if retryable is not None:
            self.retryable = retryable


class UpstreamRateLimited(UpstreamError):
    reason = "UPSTREAM_RATE_LIMITED"


class UpstreamCredentialsError(UpstreamError):
    """Our key was rejected or our OpenAI billing is exhausted: an operator problem."""

    reason = "UPSTREAM_CREDENTIALS"
    retryable = False
    breaker_failure = False
    deployment_fault = True


class UpstreamMisconfigured(UpstreamError):
    """A deployment is configured wrong in a way the upstream names (Azure: the deployment
    does not exist, the URL or api-version is not one the resource serves): an operator
    problem, never the caller's. Another deployment may serve the call; this one counts
    toward its breaker, so it is passed over until the operator fixes it."""

    reason = "UPSTREAM_MISCONFIGURED"
    retryable = False
    deployment_fault = True

    def __init__(
        self, message: str, *, problem: str, http_status: int | None = None, names_deployment: bool = False
    ) -> None:
        super().__init__(message, http_status=http_status)
        self.problem = problem
        """What is wrong, in fixed words for the operator's log (never the upstream's text)."""
        self.names_deployment = names_deployment
        """The upstream has no deployment of the name sent (Azure's DeploymentNotFound):
        the caller's mistake after all when that name was the caller's own model name,
        passed through by a ``"*"`` model entry (router.Leg.judge)."""


class UpstreamRejected(UpstreamError):
    """The upstream said the request is wrong (400/404/422): the caller's mistake.

    ``cause`` (ErrorInfo metadata) is one of our own words for the upstream's code
    (upstream/classify.py maps them); the upstream's code itself never reaches the caller.
    """

    status_name = "INVALID_ARGUMENT"
    reason = "UPSTREAM_REJECTED_REQUEST"
    retryable = False
    breaker_failure = False

    def __init__(self, message: str, *, cause: str = "OTHER", http_status: int | None = None) -> None:
        super().__init__(message, http_status=http_status)
        self.cause = cause
        self.metadata = {"cause": cause}


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not a valid chat-completions stream."""

    reason = "UPSTREAM_PROTOCOL_ERROR"


class BreakerOpen(UpstreamError):
    reason = "UPSTREAM_CIRCUIT_OPEN"
    retryable = False
    breaker_failure = False
