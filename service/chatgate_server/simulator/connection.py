"""One client connection: an ``asyncio.Protocol`` that parses requests and writes responses.

Requests on a keep-alive connection are handled one at a time: while a response is in
flight, further bytes are only buffered. The handler (``dispatch``) either answers at
once and calls ``end_response``, or starts a task and registers ``watch(on_lost)`` so
that a client close is reported the moment the protocol sees it (EOF or
``connection_lost``), even while the task sleeps, stalls or hangs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import orjson

from .wire import HttpError, Request, RequestParser, full_response

Dispatch = Callable[[Request, "Connection"], None]


class Connection(asyncio.Protocol):
    """HTTP/1.1 server side of one TCP connection."""

    def __init__(self, dispatch: Dispatch, registry: set[Connection]) -> None:
        self._dispatch = dispatch
        self._registry = registry
        self._parser = RequestParser()
        self._transport: asyncio.Transport | None = None
        self._busy = False  # a response is in flight
        self._processing = False  # inside _process: stops re-entry from end_response
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._on_lost: Callable[[], None] | None = None
        self.keep_alive = True
        self.closed = False

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        if not self._busy:
            self._process()

    def eof_received(self) -> bool:
        # Clients never half-close mid-request; EOF means they are gone. Report it now
        # rather than when the transport gets round to connection_lost.
        self._report_lost()
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._registry.discard(self)
        self._report_lost()
        self._wake_drain()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    # API for the handler

    def write(self, data: bytes) -> None:
        """Send bytes (buffered by the transport)."""
        assert self._transport is not None
        self._transport.write(data)

    @property
    def paused(self) -> bool:
        """True while the transport's write buffer is above its high-water mark."""
        return self._paused

    async def drain(self) -> None:
        """Wait until the transport accepts more data (or the connection is gone)."""
        if not self._paused or self.closed:
            return
        self._drain_waiter = asyncio.get_running_loop().create_future()
        await self._drain_waiter

    def watch(self, on_lost: Callable[[], None] | None) -> None:
        """Call ``on_lost`` once if the client goes away before the response ends."""
        self._on_lost = on_lost

    def end_response(self) -> None:
        """The response is complete: serve the next request or close."""
        self._on_lost = None
        self._busy = False
        if not self.keep_alive:
            self.close()
            return
        self._process()

    def disconnect(self) -> None:
        """Close the connection mid-response on purpose (written bytes are still flushed)."""
        self._on_lost = None
        self.close()

    def close(self) -> None:
        """Close once the write buffer is flushed."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    # internals

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while not self._busy and not self.closed:
                try:
                    request = self._parser.next_request()
                except HttpError as error:
                    self._reject(error)
                    return
                if request is None:
                    return
                self._busy = True
                self.keep_alive = request.keep_alive
                self._dispatch(request, self)
        finally:
            self._processing = False

    def _reject(self, error: HttpError) -> None:
        body = orjson.dumps(
            {
                "error": {
                    "message": error.message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        )
        self.write(full_response(error.status, "application/json", body, [], keep_alive=False))
        self.close()

    def _report_lost(self) -> None:
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()

    def _wake_drain(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
