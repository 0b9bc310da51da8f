"""CHATGATE_LOG_FORMAT=text: a line holding what a caller chose (a request id, a user id)
stays one line, and its control characters are spelled out rather than acting on the
terminal that shows the log."""

from __future__ import annotations

import io
import logging

from chatgate_server.logs import text_formatter


def test_a_callers_escapes_and_line_breaks_stay_inside_one_spelled_out_line() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(text_formatter())
    log = logging.getLogger("chatgate.test.text")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("refused user %s", "u-1\x1b]0;owned\x07\n2026-12-05 INFO chatgate: all fine")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    first, *rest = out.getvalue().splitlines()
    assert first.endswith(
        "WARNING chatgate.test.text [-]: refused user u-1\\x1b]0;owned\\x07\\x0a"
        "2026-12-05 INFO chatgate: all fine"
    )
    assert rest[0].endswith("ERROR chatgate.test.text [-]: failed")
    assert rest[1] == "Traceback (most recent call last):"  # a traceback keeps its lines
    assert "\x1b" not in out.getvalue()
