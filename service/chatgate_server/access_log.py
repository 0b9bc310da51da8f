"""One access line per call, from its usage record: what happened, never what was said."""

from __future__ import annotations

import logging

from chatgate_server.domain import UsageRecord

_log = logging.getLogger("chatgate.access")


def access_log(record: UsageRecord) -> None:
    """Log ``record`` as one structured line (JSON with the JSON formatter)."""
    if not _log.isEnabledFor(logging.INFO):
        return
    u = record.usage
    _log.info(
        "%s %s %s",
        record.request_id,
        record.outcome.value,
        record.grpc_status,
        extra={
            "access": {
                "request_id": record.request_id,
                "trace_id": record.trace_id,
                "caller": record.caller_service,
                "tenant": record.tenant,
                "user_id": record.user_id,
                "model": record.requested_model,
                "resolved_model": record.resolved_model,
                "outcome": record.outcome.value,
                "status": record.grpc_status,
                "input_tokens": u.input_tokens,
                "output_tokens": u.output_tokens,
                "usage_source": u.source,
                "cost_usd_micros": record.cost.usd_micros,
                "attempts": record.attempts,
                "ttft_ms": None
                if record.time_to_first_token_ms is None
                else round(record.time_to_first_token_ms, 2),
                "duration_ms": round(record.duration_ms, 2),
            }
        },
    )
