"""JSON log lines that join up with calls and traces.

Every line written during a call carries that call's ``request_id`` (bound once per
call by :func:`bind_request_id`), so the call's lines can be found even with tracing
off; with tracing on they also carry the trace and span ids of the OpenTelemetry
context they were logged in. Access lines (from ``chatgate.access``) carry their
fields at the top level, and any line may add top-level fields with
``extra={"fields": {...}}``. Nothing logs prompts or completions; the key is never in
a message (config keeps it in a ``Secret``).
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson
from opentelemetry import trace

from chatgate_server.terminal import shown

_request_id: ContextVar[str | None] = ContextVar("chatgate_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def bind_request_id(request_id: str) -> None:
    """Tie every line logged from here on in this context to ``request_id``.

    Set once when a call starts, not reset: each gRPC call runs in a task of its own
    (tasks copy the context), so the binding lasts exactly as long as the call, and the
    lines the RPC edge writes after the service returns still carry it.
    """
    _request_id.set(request_id)


def current_request_id() -> str | None:
    """The request id bound in this context, if any."""
    return _request_id.get()


class CallContextFilter(logging.Filter):
    """Adds ``request_id`` and the current span's ``trace_id``/``span_id`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id.get()
        if request_id is not None and getattr(record, "request_id", None) is None:
            record.request_id = request_id
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = trace.format_trace_id(ctx.trace_id)
            record.span_id = trace.format_span_id(ctx.span_id)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            line["trace_id"] = trace_id
            line["span_id"] = getattr(record, "span_id", None)
        for extra in (getattr(record, "fields", None), getattr(record, "access", None)):
            if isinstance(extra, dict):
                line.update(extra)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class _TextFormatter(logging.Formatter):
    """Each line with its non-printable characters spelled out (terminal.py): messages
    carry what callers chose (request and user ids), which must neither act on the
    terminal reading the log nor start a line of their own. A traceback, added after,
    keeps its line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return shown(super().formatMessage(record))


def text_formatter() -> logging.Formatter:
    """Human-readable lines; ``[-]`` where no call is bound."""
    return _TextFormatter(TEXT_FORMAT, defaults={"request_id": "-"})


def configure_logging(level: str, *, json_lines: bool = True) -> None:
    """Route the root logger to stderr, as JSON lines with request and trace ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CallContextFilter())
    handler.setFormatter(JsonFormatter() if json_lines else text_formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO: noise on the hot path, and a URL per line.
    logging.getLogger("httpx").setLevel(logging.WARNING)
