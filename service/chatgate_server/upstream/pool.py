"""A connection pool for one upstream that costs as little at 2,000 connections as at 2.

Written here rather than taken from httpcore: httpcore's ``AsyncConnectionPool``
re-examines every connection on each request and on each response close, and for each
idle one counts all connections again — O(n²) in the open connections. Over HTTP/1.1
a running stream holds a connection, so with 2,000 open streams that bookkeeping took
65 % of chatgate's CPU (py-spy under ``bench`` scenario ``slow``), before any byte was
relayed. This pool keeps idle connections on a stack and waiting requests in a queue:
taking and returning a connection is O(1).

Only the bookkeeping is ours. The connections are httpcore's (HTTP/1.1 through h11,
TLS, keep-alive expiry, detecting a server that closed an idle connection), on the
network backend of ``transport.py``. One pool serves one origin: chatgate has one
upstream per pool.

Idle connections are reaped on a timer (every :data:`REAP_INTERVAL_S`), not only when
the pool is next used: a connection the server closed, or one idle past its keep-alive
expiry, is closed within a second or so even when no request comes. Without it, every
connection the upstream closed after a burst of load sat in CLOSE-WAIT, holding a file
descriptor, until traffic returned (18 after a soak).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from types import TracebackType

import httpcore

from chatgate_server.background import stop_tasks

__all__ = ["REAP_INTERVAL_S", "UpstreamPool"]

# How often idle connections are checked for a server-side close or keep-alive expiry.
REAP_INTERVAL_S = 1.0


class UpstreamPool:
    """At most ``max_connections`` connections to one origin, the most recently used
    reused first (it is the one least likely to have been closed by the server)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        keepalive_expiry: float,
        network_backend: httpcore.AsyncNetworkBackend,
    ) -> None:
        self._ssl_context = ssl_context
        self._max = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._backend = network_backend
        self._origin: httpcore.Origin | None = None
        # Idle connections, oldest first: reuse pops the newest, expiry sweeps the oldest.
        self._idle: collections.deque[httpcore.AsyncHTTPConnection] = collections.deque()
        # Requests waiting for a connection while all max_connections are in use. Each
        # gets either an idle connection handed over, or None: "a slot is yours, connect".
        self._waiters: collections.deque[asyncio.Future[httpcore.AsyncHTTPConnection | None]] = (
            collections.deque()
        )
        self._live = 0  # connections open or being opened, idle ones included
        self._closed = False
        self._reaper: asyncio.Task[None] | None = None

    @property
    def connections(self) -> int:
        """Connections open (or opening) now, idle ones included."""
        return self._live

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection to become free."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        """Send ``request`` on an idle connection or a new one; the connection returns to
        the pool when the response is closed."""
        origin = request.url.origin
        if self._origin is None:
            self._origin = origin
        elif origin != self._origin:
            raise RuntimeError("an UpstreamPool serves one origin")
        timeout = request.extensions.get("timeout", {}).get("pool")
        if self._reaper is None and not self._closed:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever(), name="pool-reaper")
        while True:
            connection = await self._acquire(origin, timeout)
            try:
                response = await connection.handle_async_request(request)
            except httpcore.ConnectionNotAvailable:
                # An idle connection that stopped being usable just now: drop it, retry.
                await self._release(connection)
                continue
            except BaseException:
                await self._release(connection)
                raise
            assert isinstance(response.stream, AsyncIterable)
            return httpcore.Response(
                status=response.status,
                headers=response.headers,
                content=_ReturnOnClose(response.stream, connection, self),
                extensions=response.extensions,
            )

    async def _acquire(self, origin: httpcore.Origin, wait_s: float | None) -> httpcore.AsyncHTTPConnection:
        if self._closed:
            raise RuntimeError("the upstream pool is closed")
        while self._idle:
            connection = self._idle.pop()
            if connection.has_expired() or not connection.is_available():
                await self._drop(connection)
                continue
            return connection
        if self._live < self._max:
            self._live += 1
            return self._new_connection(origin)
        waiter: asyncio.Future[httpcore.AsyncHTTPConnection | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait_s):
                handed = await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Handed something just as we gave up: pass it on, lose nothing.
                late = waiter.result()
                if late is None:
                    self._free_slot()
                else:
                    await self._release(late)
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise httpcore.PoolTimeout("no upstream connection became free in time") from None
            raise
        return self._new_connection(origin) if handed is None else handed

    def _new_connection(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        return httpcore.AsyncHTTPConnection(
            origin=origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=self._backend,
        )

    async def _release(self, connection: httpcore.AsyncHTTPConnection) -> None:
        """Back to the pool if it can carry another request, else closed."""
        if self._closed or not connection.is_idle() or connection.has_expired():
            await self._drop(connection)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self._idle.append(connection)
        await self._sweep()

    async def _drop(self, connection: httpcore.AsyncHTTPConnection) -> None:
        # The slot first: a cancellation landing in the close must not leak it.
        self._free_slot()
        with contextlib.suppress(Exception):
            await connection.aclose()

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter: live stays the same
                return
        self._live -= 1

    async def _sweep(self) -> None:
        """Close idle connections past their keep-alive, oldest first. Only the oldest
        are looked at, so this stays O(1) per call amortised."""
        while self._idle and self._idle[0].has_expired():
            await self._drop(self._idle.popleft())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            await self.reap()

    async def reap(self) -> None:
        """Close every idle connection that the server closed or that outlived its
        keep-alive: O(idle connections), once per REAP_INTERVAL_S."""
        # Chosen without awaiting, so requests taking or returning connections in the
        # meantime see a consistent deque; closed afterwards.
        dead = [c for c in self._idle if c.has_expired() or not c.is_available()]
        if not dead:
            return
        gone = set(map(id, dead))
        self._idle = collections.deque(c for c in self._idle if id(c) not in gone)
        for connection in dead:
            await self._drop(connection)

    async def aclose(self) -> None:
        self._closed = True
        await stop_tasks(self._reaper)
        self._reaper = None
        while self._idle:
            await self._drop(self._idle.pop())

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()


class _ReturnOnClose:
    """A response body that gives its connection back to the pool when closed."""

    def __init__(
        self, stream: AsyncIterable[bytes], connection: httpcore.AsyncHTTPConnection, pool: UpstreamPool
    ) -> None:
        self._stream = stream
        self._connection = connection
        self._pool = pool
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._stream, "aclose", None)
            if close is not None:
                await close()
        finally:
            await self._pool._release(self._connection)
