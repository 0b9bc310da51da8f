"""Sans-IO server-sent-events decoding: bytes in, event data payloads out.

Implements the event-stream parsing rules of the WHATWG HTML spec (section 9.2.6),
keeping only what a chat-completions stream needs: the ``data`` field. Comments and
the ``event``, ``id`` and ``retry`` fields are parsed and dropped.

This runs on every token, so the common shape of an OpenAI stream (LF line ends, one
``data: `` line per event) takes a fast path: find the last complete event in the
buffered bytes, decode everything up to it once, and split that text on
``"\\n\\ndata: "`` (one C-level pass that yields the payloads themselves). Anything
else (comments, other fields, multi-line data, no space after the colon) goes
through a per-line parser, and CR / CRLF line ends are rewritten to LF at byte level
before either runs.
"""

from __future__ import annotations

import re

from chatgate_server.errors import UpstreamProtocolError

__all__ = ["MAX_EVENT_BYTES", "SSEDecoder"]

# The most of one unfinished event held: a chat-completions chunk is a few KB (one with
# 20 top log-probabilities per token, or a long tool-call fragment, tens of KB). An
# upstream that never ends its event must fail the stream, not fill memory until the
# deadline.
MAX_EVENT_BYTES = 1 << 20

_BOM = b"\xef\xbb\xbf"
# One pass for both CRLF and lone CR; twice as fast as bytes.replace(b"\r\n", ...).
_CR_LINE_END = re.compile(rb"\r\n?")


class SSEDecoder:
    """Incremental SSE decoder; feed it bytes as they arrive, in pieces of any size.

    Each payload returned is the value of an event's ``data`` field (several
    ``data`` lines joined with ``"\\n"``). Events without a ``data`` field are
    dropped. Bytes that are not valid UTF-8 decode to U+FFFD, as the spec says.
    One decoder serves one stream.
    """

    __slots__ = ("_at_start", "_buf", "_data", "_skip_lf")

    def __init__(self) -> None:
        # Bytes after the last complete event: never contains b"\n\n", never
        # starts with b"\n", never contains b"\r" (CR is rewritten before buffering).
        self._buf = b""
        # The previous feed ended in CR, so an LF at the start of the next one is
        # the second half of a CRLF, not a line end of its own.
        self._skip_lf = False
        # A leading byte-order mark may still arrive (it is dropped, per the spec).
        self._at_start = True
        # ``data`` values of the event being parsed by the slow path. Always empty
        # between calls: the slow path only ever sees complete events.
        self._data: list[str] = []

    def feed(self, data: bytes) -> list[str]:
        """Take the next bytes of the stream; return the payloads of the events they complete."""
        if self._skip_lf or b"\r" in data:
            data = self._normalise_line_ends(data)
        if self._at_start:
            data = self._strip_bom(data)
            if self._at_start:
                return []
        old = self._buf
        buf = old + data if old else data
        # The old buffer holds no b"\n\n", so only its last byte can start one.
        end = buf.rfind(b"\n\n", len(old) - 1 if old else 0)
        if end < 0:
            if len(buf) > MAX_EVENT_BYTES:
                raise UpstreamProtocolError(f"upstream stream event exceeds {MAX_EVENT_BYTES} bytes")
            self._buf = buf
            return []
        self._buf = buf[end + 2 :]
        # The cut is right after an LF, which never splits a UTF-8 sequence, so the
        # complete events decode in one go and the partial one waits as bytes.
        if buf.startswith(b"data: ") and buf.find(b"\n", 6, end) < 0:
            # The usual read: exactly one complete one-line event.
            return [buf[6:end].decode("utf-8", "replace")]
        text = buf[:end].decode("utf-8", "replace")
        if text.startswith("data: "):
            # Fast path. If no piece holds an LF, every LF in ``text`` belonged to a
            # separator, so ``text`` was nothing but one-line ``data: `` events
            # separated by blank lines, and the pieces are their payloads.
            payloads = text[6:].split("\n\ndata: ")
            for payload in payloads:
                if "\n" in payload:
                    break
            else:
                return payloads
        out: list[str] = []
        self._parse_lines(text, out)
        return out

    def flush(self) -> list[str]:
        """End of stream: return the payload of an event left without its closing blank line.

        An unterminated last line counts as a line. The decoder is empty afterwards.
        """
        buf = self._buf
        self._buf = b""
        self._skip_lf = False
        if self._at_start:
            # At most a prefix of a byte-order mark ever arrived: nothing to parse.
            self._at_start = False
            buf = b""
        out: list[str] = []
        if buf:
            self._parse_lines(buf.decode("utf-8", "replace"), out)
        return out

    def _normalise_line_ends(self, data: bytes) -> bytes:
        """Rewrite CRLF and CR to LF. Safe at byte level: CR and LF never occur inside UTF-8 sequences."""
        if self._skip_lf and data:
            if data[0] == 0x0A:
                data = data[1:]
            self._skip_lf = False
        if data.endswith(b"\r"):
            self._skip_lf = True
        return _CR_LINE_END.sub(b"\n", data)

    def _strip_bom(self, data: bytes) -> bytes:
        """Drop a byte-order mark at the very start; hold back a prefix of one until decided."""
        head = self._buf + data
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._buf = head
            return b""
        self._at_start = False
        self._buf = b""
        return head[len(_BOM) :] if head.startswith(_BOM) else head

    def _parse_lines(self, text: str, out: list[str]) -> None:
        """The general path: parse LF-separated lines, then end the event as a blank line would."""
        data = self._data
        for line in text.split("\n"):
            if not line:
                self._dispatch(out)
                continue
            if line[0] == ":":  # a comment
                continue
            name, colon, value = line.partition(":")
            if name != "data":  # event, id, retry and unknown fields: not needed here
                continue
            if colon and value[:1] == " ":
                value = value[1:]
            data.append(value)
        self._dispatch(out)

    def _dispatch(self, out: list[str]) -> None:
        """A blank line: emit the pending event if it had any data field."""
        if self._data:
            out.append("\n".join(self._data))
            self._data.clear()
