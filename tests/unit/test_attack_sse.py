"""An upstream that never ends its event: the SSE decoder holds at most MAX_EVENT_BYTES
of an unfinished event, then fails the stream (UpstreamProtocolError) instead of
buffering until memory runs out."""

from __future__ import annotations

import pytest

from chatgate_server.errors import UpstreamProtocolError
from chatgate_server.upstream.sse import MAX_EVENT_BYTES, SSEDecoder


@pytest.mark.parametrize("line", [b"data: " + b"a" * 1000, b"a" * 1000, b"data: x\n" * 100])
def test_an_event_that_never_ends_is_a_protocol_error(line: bytes) -> None:
    decoder = SSEDecoder()
    fed = 0
    with pytest.raises(UpstreamProtocolError):
        while fed <= 2 * MAX_EVENT_BYTES:
            decoder.feed(line if fed else b"data: " + line)
            fed += len(line)


def test_a_large_event_within_the_bound_still_passes() -> None:
    decoder = SSEDecoder()
    payload = b"x" * (MAX_EVENT_BYTES // 2)
    out = []
    for start in range(0, len(payload), 65536):
        out += decoder.feed((b"data: " if start == 0 else b"") + payload[start : start + 65536])
    out += decoder.feed(b"\n\n")
    assert out == [payload.decode()]
