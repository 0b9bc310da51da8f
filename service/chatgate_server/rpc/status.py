"""The one place an error becomes a gRPC status with rich details.

Details travel as a ``google.rpc.Status`` in the trailers (grpcio-status): an
ErrorInfo with a stable reason code always; RetryInfo when waiting helps;
BadRequest field violations for invalid input. Anything that is not a
:class:`ChatgateError` becomes INTERNAL with a generic message (the edge, ``rpc/edge.py``,
logs it once) — never a stack trace or a secret to the caller.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from chatgate_server.errors import (
    ChatgateError,
    InvalidRequest,
    QuotaExceeded,
    UpstreamError,
    sane_retry_delay,
)

ERROR_DOMAIN = "chatgate"
# The status travels in trailers, which gRPC caps (8 KiB by default; beyond that the
# caller gets RESOURCE_EXHAUSTED instead of our answer). The message goes twice (as
# grpc-message, percent-encoded, and inside the base64 details), so it and the
# violations listed are bounded in bytes: a status always fits, whatever the request
# held. Violations past the budget are counted in the message ("and N more").
MAX_MESSAGE_BYTES = 512
VIOLATIONS_BUDGET_BYTES = 3072
_MAX_FIELD_BYTES = 160
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# The longest RetryInfo delay a client's transparent gRPC retry may wait out.
MAX_TRANSPARENT_RETRY_WAIT_S = 2.0
_MAX_DESCRIPTION_BYTES = 240


def to_status(error: BaseException) -> grpc.Status:
    """The gRPC status (code, message, rich details) the caller gets for ``error``."""
    if not isinstance(error, ChatgateError):
        error = ChatgateError("internal error")
    code = getattr(code_pb2, error.status_name)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    details = [_packed(info)]
    # Clamped again here: retry_after is a plain attribute, and a Duration that cannot
    # hold the value would turn the whole status into UNKNOWN.
    seconds = sane_retry_delay(error.retry_after)
    if seconds is not None:
        whole = math.floor(seconds)
        delay = duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    if isinstance(error, InvalidRequest):
        details.append(_packed(error_details_pb2.BadRequest(field_violations=_violations(error))))
    if isinstance(error, QuotaExceeded):
        details.append(_packed(_quota_failure(error)))
    message = _bounded(error.message, MAX_MESSAGE_BYTES)
    status = rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))
    pushback = retry_pushback_ms(error)
    if pushback is not None:
        trailers = (*status.trailing_metadata, (RETRY_PUSHBACK_KEY, pushback))
        status = status._replace(trailing_metadata=trailers)
    return status  # type: ignore[no-any-return]


def retry_pushback_ms(error: ChatgateError) -> str | None:
    """The ``grpc-retry-pushback-ms`` trailer for an UNAVAILABLE refusal, or None.

    Clients with a gRPC retry policy for UNAVAILABLE (ours, by default) retry a call that
    got no response yet on their own, on whichever replica their balancer picks next;
    this trailer is how the server steers that. What another replica can answer (this
    one is draining, its ledger is full, its caller table not loaded) is retried after
    the client's backoff, or after RetryInfo's delay when that is short. ``-1`` forbids
    the retry for upstream failures, which every replica shares and which chatgate has
    already retried within the deadline (a transparent retry would multiply the load on
    a failing upstream and trip the breaker), and for a RetryInfo delay too long to
    hide: the caller decides, with the reason in hand, instead of its deadline running
    out in a silent wait.
    """
    if error.status_name != "UNAVAILABLE":
        return None
    if isinstance(error, UpstreamError):
        return "-1"
    delay = sane_retry_delay(error.retry_after)
    if delay is None:
        return None
    return "-1" if delay > MAX_TRANSPARENT_RETRY_WAIT_S else str(round(delay * 1000))


def _violations(error: InvalidRequest) -> list[error_details_pb2.BadRequest.FieldViolation]:
    out, used = [], 0
    for v in error.violations:
        field = _bounded(v.field, _MAX_FIELD_BYTES)
        description = _bounded(v.description, _MAX_DESCRIPTION_BYTES)
        used += len(field.encode()) + len(description.encode()) + 8  # + protobuf framing
        if used > VIOLATIONS_BUDGET_BYTES:
            break
        out.append(error_details_pb2.BadRequest.FieldViolation(field=field, description=description))
    return out


def _quota_failure(error: QuotaExceeded) -> error_details_pb2.QuotaFailure:
    out, used = [], 0
    for v in error.violations:
        subject = _bounded(v.subject, _MAX_FIELD_BYTES)
        description = _bounded(v.description, _MAX_DESCRIPTION_BYTES)
        used += len(subject.encode()) + len(description.encode()) + 8
        if used > VIOLATIONS_BUDGET_BYTES:
            break
        out.append(error_details_pb2.QuotaFailure.Violation(subject=subject, description=description))
    return error_details_pb2.QuotaFailure(violations=out)


def _bounded(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (on a character boundary)."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode(errors="ignore") + "…"


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed
