"""One access line per call, whatever its end: what happened, never what was said.

The rpc edge opens a :class:`CallLine` when a call arrives and writes it when the call
ends (:func:`close_line`), so a call refused before any work — invalid, oversized, over
a limit, a taken request id — leaves its line too. A call that reached the
CompletionService hands over its usage record with :func:`access_log`; its line then
carries the outcome, tokens and cost. Without an open line (a CompletionService used
outside a server), :func:`access_log` writes the record's line at once.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass, field

from chatgate_server.domain import Caller, UsageRecord

_log = logging.getLogger("chatgate.access")


@dataclass(slots=True, eq=False)
class CallLine:
    """What the access line of one running call will say."""

    method: str
    caller: Caller | None = None
    started: float = field(default_factory=time.perf_counter)
    request_id: str | None = None
    user_id: str | None = None
    model: str | None = None
    record: UsageRecord | None = None


_current: ContextVar[CallLine | None] = ContextVar("chatgate_access_line", default=None)


def open_line(method: str, caller: Caller | None) -> tuple[CallLine, Token[CallLine | None]]:
    """Start the line of the call running in this context (``caller`` None: not known yet;
    the edge sets ``line.caller`` once the credential is verified)."""
    line = CallLine(method, caller)
    return line, _current.set(line)


def note_request(request_id: str, user_id: str, model: str) -> None:
    """Name the running call's request, so its line says which even if it is refused next."""
    line = _current.get()
    if line is not None:
        line.request_id, line.user_id, line.model = request_id, user_id, model


def access_log(record: UsageRecord) -> None:
    """The usage record of a call: goes on the call's line, or out at once without one."""
    line = _current.get()
    if line is not None:
        line.record = record
    else:
        _write(None, record, record.grpc_status, None, record.duration_ms)


def close_line(line: CallLine, token: Token[CallLine | None], status: str, reason: str | None) -> None:
    """Write ``line`` with the status the caller got (the usage record's, when there is one:
    it tells a deadline from a cancel, which the edge cannot)."""
    _current.reset(token)
    record = line.record
    if record is not None:
        _write(line, record, record.grpc_status, reason, record.duration_ms)
    else:
        _write(line, None, status, reason, (time.perf_counter() - line.started) * 1000)


def _write(
    line: CallLine | None, record: UsageRecord | None, status: str, reason: str | None, duration_ms: float
) -> None:
    if not _log.isEnabledFor(logging.INFO):
        return
    fields = _record_fields(record) if record is not None else _refusal_fields(line)
    fields["status"] = status
    fields["reason"] = reason
    fields["duration_ms"] = round(duration_ms, 2)
    if line is not None:
        fields["method"] = line.method
        # The credential's public id (never the token): which key of the caller it was.
        fields["credential_id"] = (line.caller.credential_id or None) if line.caller is not None else None
    _log.info(
        "%s %s %s", fields["request_id"] or "-", fields["outcome"] or "-", status, extra={"access": fields}
    )


def _record_fields(record: UsageRecord) -> dict[str, object]:
    u = record.usage
    return {
        "request_id": record.request_id,
        "trace_id": record.trace_id,
        "caller": record.caller_service,
        "tenant": record.tenant,
        "user_id": record.user_id,
        "model": record.requested_model,
        "resolved_model": record.resolved_model,
        "outcome": record.outcome.value,
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "usage_source": u.source,
        "cost_usd_micros": record.cost.usd_micros,
        "attempts": record.attempts,
        "deployment": record.deployment,
        "ttft_ms": None if record.time_to_first_token_ms is None else round(record.time_to_first_token_ms, 2),
    }


def _refusal_fields(line: CallLine | None) -> dict[str, object]:
    """A call that never produced a usage record: nothing was sent upstream or billed."""
    caller = line.caller if line is not None else None
    return {
        "request_id": line.request_id if line is not None else None,
        "caller": caller.service if caller is not None else None,
        "tenant": caller.tenant if caller is not None else None,
        "user_id": line.user_id if line is not None else None,
        "model": line.model if line is not None else None,
        "outcome": None,
        "attempts": 0,
    }
