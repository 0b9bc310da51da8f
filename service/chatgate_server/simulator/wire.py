"""Minimal HTTP/1.1: an incremental request parser and response framing.

Enough for what httpx (and curl) send: a request line, headers, an optional
``Content-Length`` body, keep-alive by default on HTTP/1.1, ``Connection: close``.
Chunked *request* bodies are refused (501): no client of the simulator sends them.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

MAX_HEAD = 64 * 1024
MAX_BODY = 32 * 1024 * 1024

LAST_CHUNK = b"0\r\n\r\n"


class HttpError(Exception):
    """A request the parser cannot accept; answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Request:
    """One parsed request. Header names are lower-cased; repeated headers are joined by ", ".

    ``path`` is the target without its query; ``query`` is the raw text after ``?``
    (Azure's ``api-version`` travels there)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    query: str = ""


class RequestParser:
    """Feed it bytes as they arrive; ``next_request`` returns each complete request once."""

    __slots__ = ("_body_length", "_buffer", "_head")

    def __init__(self) -> None:
        self._buffer = bytearray()
        # The parsed head of a request whose body has not fully arrived, so the head is
        # not parsed again on every read.
        self._head: Request | None = None
        self._body_length = 0

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def next_request(self) -> Request | None:
        """The next complete request, or None until more bytes arrive. Raises HttpError."""
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    raise HttpError(431, "request head too large")
                return None
            self._head, self._body_length = _parse_head(bytes(buffer[:end]))
            del buffer[: end + 4]
        if len(buffer) < self._body_length:
            return None
        request, self._head = self._head, None
        request.body = bytes(buffer[: self._body_length])
        del buffer[: self._body_length]
        return request


def _parse_head(head: bytes) -> tuple[Request, int]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name[-1] in " \t":
            raise HttpError(400, "malformed header line")
        name = name.lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if "transfer-encoding" in headers:
        raise HttpError(501, "chunked request bodies are not supported")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise HttpError(400, "bad content-length")
    length = int(length_text)
    if length > MAX_BODY:
        raise HttpError(413, "request body too large")
    connection = headers.get("connection", "").lower()
    # HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 only when asked.
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    path, _, query = target.partition("?")
    return Request(method, path, headers, b"", keep_alive, query), length


_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}


def response_head(status: int, headers: list[tuple[str, str]], *, keep_alive: bool) -> bytes:
    """The status line and headers, ending with the blank line."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    lines.extend(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers)
    lines.append(b"connection: keep-alive\r\n\r\n" if keep_alive else b"connection: close\r\n\r\n")
    return b"".join(lines)


def frame_chunk(data: bytes) -> bytes:
    """One chunk of a ``Transfer-Encoding: chunked`` body (nothing for no data)."""
    if not data:
        # An empty chunk would be the terminator and end the body early.
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def full_response(
    status: int, content_type: str, body: bytes, headers: list[tuple[str, str]], *, keep_alive: bool
) -> bytes:
    """A complete response with a ``Content-Length`` body."""
    all_headers = [("content-type", content_type), ("content-length", str(len(body))), *headers]
    return response_head(status, all_headers, keep_alive=keep_alive) + body
