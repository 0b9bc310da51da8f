"""A tiny gRPC-over-HTTP/2 client for the load generator: cheap enough not to be the bottleneck.

grpcio's asyncio client costs about as much CPU per message as the server spends
sending it (tens of µs), so on a 2-core machine it cannot load one server core, let
alone two. This client does only what a closed-loop benchmark needs, on one
``asyncio.Protocol`` per connection and with no per-message awaits:

- cleartext HTTP/2 (prior knowledge), one request per stream, many streams per
  connection; SETTINGS and PING are acknowledged;
- the request headers are one precomputed HPACK block (literals, no Huffman, no
  dynamic table), so no HPACK encoder is needed;
- response headers are never decoded. A stream succeeded when its last gRPC message
  is ``finished`` (the contract says a stream without it failed); RST_STREAM, GOAWAY,
  a lost connection or a trailers-only reply count as errors.

Flow control has two modes. By default the client is a fast reader: it announces big
windows and returns credit as data arrives, so it never throttles the server. With
``hold=True`` it behaves like a gRPC client whose application reads slowly (grpc-go
and grpc-java work this way): messages queue in the stream, and stream-level credit
goes back only when the application takes a message with :meth:`Stream.next`, so a
slow reader stops the server once the announced window (64 KiB) is full. grpcio's
own client does not do that — it keeps reading from the socket whatever the
application does — which is why the slow-consumer scenario uses this one.
"""

from __future__ import annotations

import asyncio
import collections
import struct
import time
from collections.abc import Callable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4

FAST_STREAM_WINDOW = 1 << 24  # fast reader: never the server's limit
SLOW_STREAM_WINDOW = 65535  # slow reader: HTTP/2's and gRPC's default
CONNECTION_WINDOW = 1 << 30

_U32 = struct.Struct(">I")


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + _U32.pack(stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK "literal header field without indexing, new name" (strings < 127 bytes, no Huffman)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


def _indexed_name(index: int, value: bytes) -> bytes:
    """HPACK literal without indexing, name from the static table (index < 16)."""
    assert index < 16 and len(value) < 127
    return bytes((index, len(value))) + value


def request_headers(authority: str, path: str, token: str | None = None) -> bytes:
    """The HPACK block of a gRPC request; the same for every stream of a connection.
    With ``token``, every call carries ``authorization: Bearer <token>`` (a literal, not
    indexed: the server reads and verifies it on every call, as with a real client)."""
    block = (
        b"\x83"  # :method POST (static table entry 3)
        + b"\x86"  # :scheme http (static table entry 6)
        + _indexed_name(4, path.encode())  # :path
        + _indexed_name(1, authority.encode())  # :authority
        + _literal(b"content-type", b"application/grpc")
        + _literal(b"te", b"trailers")
        + _literal(b"user-agent", b"chatgate-bench")
    )
    if token is not None:
        block += _literal(b"authorization", f"Bearer {token}".encode())
    return block


class Stream:
    """One call: its first message, message count, last message and end.

    In ``hold`` mode the messages also queue for :meth:`next`.
    """

    __slots__ = (
        "_credit",
        "_waiter",
        "buf",
        "done",
        "first",
        "first_at",
        "last",
        "messages",
        "queue",
        "unacked",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, credit: Callable[[int], None] | None) -> None:
        self.first: bytes | None = None
        self.first_at = 0.0
        self.last = b""
        self.messages = 0
        self.buf = b""
        self.unacked = 0  # fast mode: bytes received but not yet credited back
        self.queue: collections.deque[bytes] | None = collections.deque() if credit else None
        self._credit = credit
        self._waiter: asyncio.Future[None] | None = None
        self.done: asyncio.Future[None] = loop.create_future()

    async def next(self) -> bytes | None:
        """Hold mode: the next message (crediting its bytes to the server), None at the end."""
        assert self.queue is not None and self._credit is not None
        while not self.queue:
            if self.done.done():
                self.done.result()  # raises the stream's error, if it failed
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._waiter, self.done], return_when=asyncio.FIRST_COMPLETED)
        msg = self.queue.popleft()
        self._credit(len(msg) + 5)
        return msg

    def _push(self, msg: bytes) -> None:
        assert self.queue is not None
        self.queue.append(msg)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying any number of concurrent gRPC calls."""

    def __init__(self, authority: str, path: str, *, hold: bool = False, token: str | None = None) -> None:
        self._headers = request_headers(authority, path, token)
        self._hold = hold
        self._window = SLOW_STREAM_WINDOW if hold else FAST_STREAM_WINDOW
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._next_id = 1
        self._streams: dict[int, Stream] = {}
        self._unacked = 0  # connection-level bytes received but not yet credited back
        self._loop = asyncio.get_running_loop()
        self.closed = False

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        settings = struct.pack(">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, self._window)
        transport.write(  # type: ignore[attr-defined]
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - 65535))
        )

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos, end = 0, len(buf)
        streams = self._streams
        out: list[bytes] = []
        while end - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if end - pos - 9 < length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = _U32.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
            payload = buf[pos + 9 : pos + 9 + length]
            pos += 9 + length
            if kind == DATA:
                # Connection-level credit goes back on receipt (one slow stream must not
                # stall the others); stream-level credit as the application reads.
                self._unacked += length
                stream = streams.get(sid)
                if stream is not None:
                    self._data(stream, payload)
                    if flags & END_STREAM:
                        self._end(sid, None)
                    elif stream.queue is None:
                        stream.unacked += length
                        if stream.unacked > self._window // 2:
                            out.append(frame(WINDOW_UPDATE, 0, sid, _U32.pack(stream.unacked)))
                            stream.unacked = 0
            elif kind == HEADERS:
                if flags & END_STREAM:
                    self._end(sid, None)
            elif kind == SETTINGS:
                if not flags & ACK:
                    out.append(frame(SETTINGS, ACK, 0))
            elif kind == PING:
                if not flags & ACK:
                    out.append(frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                self._end(sid, ConnectionError(f"stream reset (code {int.from_bytes(payload, 'big')})"))
            elif kind == GOAWAY:
                self._fail_all(ConnectionError("server sent GOAWAY"))
        self._buf = buf[pos:]
        if self._unacked > CONNECTION_WINDOW // 2 or (self._hold and self._unacked > 65535):
            out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._unacked)))
            self._unacked = 0
        if out and self._transport is not None:
            self._transport.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_all(ConnectionError("connection lost"))

    # --- calls ---

    def call(self, message: bytes) -> Stream:
        """Start a call with one serialized request message; await ``stream.done``."""
        if self.closed or self._transport is None:
            raise ConnectionError("connection closed")
        sid = self._next_id
        self._next_id += 2
        stream = Stream(self._loop, self._crediter(sid) if self._hold else None)
        self._streams[sid] = stream
        body = b"\x00" + _U32.pack(len(message)) + message
        self._transport.write(
            frame(HEADERS, END_HEADERS, sid, self._headers) + frame(DATA, END_STREAM, sid, body)
        )
        return stream

    def cancel(self, stream: Stream) -> None:
        """Reset a call (RST_STREAM CANCEL), as a client that gives up does."""
        for sid, s in list(self._streams.items()):
            if s is stream:
                if self._transport is not None and not self.closed:
                    self._transport.write(frame(RST_STREAM, 0, sid, _U32.pack(0x8)))
                self._end(sid, ConnectionError("cancelled"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # --- internals ---

    def _crediter(self, sid: int) -> Callable[[int], None]:
        def credit(n: int) -> None:
            if self._transport is not None and not self.closed and sid in self._streams:
                self._transport.write(frame(WINDOW_UPDATE, 0, sid, _U32.pack(n)))

        return credit

    def _data(self, stream: Stream, payload: bytes) -> None:
        if stream.buf:
            payload = stream.buf + payload
            stream.buf = b""
        pos, end = 0, len(payload)
        while end - pos >= 5:
            size = _U32.unpack_from(payload, pos + 1)[0]
            if end - pos - 5 < size:
                break
            msg = payload[pos + 5 : pos + 5 + size]
            pos += 5 + size
            if stream.first is None:
                stream.first = msg
                stream.first_at = time.perf_counter()
            stream.last = msg
            stream.messages += 1
            if stream.queue is not None:
                stream._push(msg)
        if pos < end:
            stream.buf = payload[pos:]

    def _end(self, sid: int, error: Exception | None) -> None:
        stream = self._streams.pop(sid, None)
        if stream is None or stream.done.done():
            return
        if error is None:
            stream.done.set_result(None)
        else:
            stream.done.set_exception(error)
            # Nobody may be waiting on a stream that was cancelled on purpose.
            stream.done.add_done_callback(lambda f: f.exception())

    def _fail_all(self, error: Exception) -> None:
        for sid in list(self._streams):
            self._end(sid, error)
