"""The one exception a failed call raises, with the server's rich error details.

chatgate sends a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer: an
ErrorInfo (a stable ``reason``) always, RetryInfo when waiting helps, BadRequest field
violations for invalid input and QuotaFailure when a quota is exhausted. Errors made
by gRPC itself (a deadline hit on the client's side, a connection refused, the server's
concurrency limit) carry no details: ``reason`` is then empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, get_args

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from chatgate.client.result import Completion

STATUS_DETAILS_KEY = "grpc-status-details-bin"

LimitReason = Literal[
    "REQUESTS_PER_MINUTE_EXCEEDED",
    "TOKENS_PER_MINUTE_EXCEEDED",
    "TOKENS_PER_DAY_EXCEEDED",
    "SPEND_PER_DAY_EXCEEDED",
    "SPEND_PER_MONTH_EXCEEDED",
    "CONCURRENT_STREAMS_EXCEEDED",
]
"""The reasons of a RESOURCE_EXHAUSTED from one of chatgate's limits (per tenant, caller
or end user): which kind of limit refused the call. ``quota_violations`` say whose."""

LIMIT_REASONS: frozenset[str] = frozenset(get_args(LimitReason))

ErrorReason = Literal[
    LimitReason,
    "BLOCKED",
    "INVALID_REQUEST",
    "REQUEST_TOO_LARGE",
    "UPSTREAM_REJECTED_REQUEST",
    "UPSTREAM_UNAVAILABLE",
    "UPSTREAM_RATE_LIMITED",
    "UPSTREAM_CIRCUIT_OPEN",
    "UPSTREAM_PROTOCOL_ERROR",
    "UPSTREAM_CREDENTIALS",
    "UPSTREAM_MISCONFIGURED",
    "SHUTTING_DOWN",
    "USAGE_LEDGER_FULL",
    "SERVICE_UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "DUPLICATE_REQUEST_ID",
    "CONCURRENCY_LIMIT",
    "REQUEST_BYTES_LIMIT",
    "HEALTH_WATCH_LIMIT",
    "CREDENTIAL_MISSING",
    "CREDENTIAL_INVALID",
    "CREDENTIAL_REVOKED",
    "CREDENTIAL_EXPIRED",
    "PERMISSION_DENIED",
    "CALLERS_UNAVAILABLE",
    "REQUESTS_PER_MINUTE_EXCEEDED",
    "TOKENS_PER_MINUTE_EXCEEDED",
    "TOKENS_PER_DAY_EXCEEDED",
    "SPEND_PER_DAY_EXCEEDED",
    "SPEND_PER_MONTH_EXCEEDED",
    "CONCURRENT_STREAMS_EXCEEDED",
    "INTERNAL",
    "INCOMPLETE_STREAM",
]
"""Every ErrorInfo reason chatgate sends (docs/CALLING.md has what each means), and
``INCOMPLETE_STREAM``, which this client makes for a stream that ended OK without its
final event. A test keeps this list in step with the server's errors."""

KNOWN_REASONS: frozenset[str] = frozenset(get_args(ErrorReason))


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of the request (from BadRequest), e.g. ``user_id``: "required"."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One exhausted quota (from QuotaFailure): whose (``subject``) and what."""

    subject: str
    description: str
    quota_id: str = ""
    quota_metric: str = ""


class ChatgateError(Exception):
    """A chatgate call failed. Every error from the client is this one type.

    Attributes:
        code: the gRPC status code.
        message: the status message, written for the caller.
        reason: ErrorInfo's stable UPPER_SNAKE reason (e.g. ``UPSTREAM_CIRCUIT_OPEN``);
            empty when the status had no details. :attr:`known_reason` is the same as an
            :data:`ErrorReason`, for exhaustive matching.
        domain: ErrorInfo's domain (``"chatgate"``).
        error_metadata: ErrorInfo's metadata.
        retry_delay: RetryInfo in seconds: the earliest a retry may succeed; or None
            (for a limit: waiting does not help within the hour).
        field_violations: BadRequest violations (INVALID_ARGUMENT).
        quota_violations: QuotaFailure violations (RESOURCE_EXHAUSTED from a limit):
            each names the limit's subject (``user:acme/u-42``…) and what it counts.
        events_received: how many events the stream delivered before it failed.
        partial: set by ``collect()``: what arrived before the failure (e.g. the text
            kept when the deadline cut a stream, with its final usage), or None.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        error_metadata: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        quota_violations: tuple[QuotaViolation, ...] = (),
        events_received: int = 0,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.error_metadata: Mapping[str, str] = dict(error_metadata or {})
        self.retry_delay = retry_delay
        self.field_violations = field_violations
        self.quota_violations = quota_violations
        self.events_received = events_received
        self.partial: Completion | None = None

    @property
    def known_reason(self) -> ErrorReason | None:
        """``reason`` when it is one this client knows; None when empty or newer than it."""
        return cast("ErrorReason", self.reason) if self.reason in KNOWN_REASONS else None

    @property
    def limit_exceeded(self) -> bool:
        """Whether one of chatgate's limits refused the call (a :data:`LimitReason`)."""
        return self.reason in LIMIT_REASONS

    @property
    def waiting_helps(self) -> bool:
        """Whether the same call should succeed after waiting :attr:`retry_delay` seconds.

        True when chatgate said when the call would fit (RetryInfo) and nothing was
        delivered yet: a per-minute limit, a daily budget that resets within the hour,
        a replica at its concurrency limit. False when no wait of an hour or less helps
        (a monthly budget spent, a block, a RESOURCE_EXHAUSTED without RetryInfo): do
        not retry soon; tell the user, or fall back.
        """
        return self.retry_delay is not None and self.retryable

    @property
    def retryable(self) -> bool:
        """Whether calling again with the same request may succeed without re-billing.

        Only before the first event: after that the upstream has been paid and the
        tokens were delivered. UNAVAILABLE is transient unless it is chatgate's own
        upstream key or deployment configuration (operator problems no retry fixes);
        RESOURCE_EXHAUSTED only with a ``retry_delay`` (chatgate's own limits and
        quotas that reset always send one: without it, the limit is not one that
        passes, e.g. gRPC's own message size limit). Wait at least ``retry_delay`` when it is set.
        """
        if self.events_received:
            return False
        if self.code is grpc.StatusCode.UNAVAILABLE:
            return self.reason not in ("UPSTREAM_CREDENTIALS", "UPSTREAM_MISCONFIGURED")
        if self.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return self.retry_delay is not None
        return False


class FailedCall(Protocol):
    """What both grpc's sync ``RpcError`` and ``grpc.aio.AioRpcError`` offer."""

    def code(self) -> grpc.StatusCode: ...  # pragma: no cover - protocol
    def details(self) -> str | None: ...  # pragma: no cover - protocol
    def trailing_metadata(self) -> Any: ...  # pragma: no cover - protocol


def from_call(call: FailedCall, events_received: int) -> ChatgateError:
    """The :class:`ChatgateError` for a failed call, with its rich details decoded."""
    code = call.code()
    message = call.details() or ""
    status = _status_details(call.trailing_metadata() or ())
    if status is None or status.code != code.value[0]:
        # No details, or details that do not belong to this status (a proxy rewrote it).
        return ChatgateError(code, message, events_received=events_received)
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    bad = error_details_pb2.BadRequest()
    quota = error_details_pb2.QuotaFailure()
    found: dict[str, Any] = {}
    for detail in status.details:
        for name, target in (("info", info), ("retry", retry), ("bad", bad), ("quota", quota)):
            if detail.Is(target.DESCRIPTOR):
                detail.Unpack(target)
                found[name] = target
    delay = retry.retry_delay.ToTimedelta().total_seconds() if "retry" in found else None
    return ChatgateError(
        code,
        message or str(status.message),
        reason=str(info.reason),
        domain=str(info.domain),
        error_metadata={str(k): str(v) for k, v in info.metadata.items()},
        retry_delay=delay,
        field_violations=tuple(
            FieldViolation(str(v.field), str(v.description)) for v in bad.field_violations
        ),
        quota_violations=tuple(
            QuotaViolation(str(v.subject), str(v.description), str(v.quota_id), str(v.quota_metric))
            for v in quota.violations
        ),
        events_received=events_received,
    )


def _status_details(metadata: Iterable[tuple[str, str | bytes]]) -> Any:
    for key, value in metadata:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None  # undecodable details: the code and message still stand
    return None
