"""httpcore's connections on plain asyncio streams instead of anyio's.

httpcore (httpx's engine) talks to sockets, on asyncio, through anyio. Two reasons to
give it an asyncio-native network backend instead:

- Back-pressure. anyio's socket stream pauses reading only after it had to wait for
  data; when a response's first bytes are already there on the first read (the usual
  case on a fast upstream), the transport is never paused, and everything the
  upstream sends is read into memory however slowly we relay it. A caller that reads
  slowly then costs chatgate the whole upstream response in RAM, and the upstream is
  never slowed down. ``asyncio.StreamReader`` pauses the socket once
  ``2 × READ_LIMIT`` bytes wait unread, so a slow caller's stream holds at most that
  much here; the rest waits in the kernel and then in the upstream.
- Cost per read: anyio wraps every read in cancel scopes and checkpoints; here a read
  is one ``StreamReader.read`` (inside ``asyncio.timeout`` when httpcore passes one).

Everything above the socket (HTTP/1.1 parsing, keep-alive, TLS through ``start_tls``,
exception types) stays httpcore's own; the pool is ours (``pool.py`` says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

from chatgate_server.upstream.pool import UpstreamPool

# The method signatures are httpcore's (AsyncNetworkStream/Backend), timeouts included.
# ruff: noqa: ASYNC109

# StreamReader pauses the socket when 2 × this many bytes are buffered unread.
READ_LIMIT = 64 * 1024


@contextlib.contextmanager
def _mapped(timeout: type[Exception], error: type[Exception]) -> Iterator[None]:
    """asyncio's and the OS's exceptions as the httpcore ones its connections expect."""
    try:
        yield
    except TimeoutError as exc:
        raise timeout(str(exc) or "timed out") from exc
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
        raise error(str(exc) or type(exc).__name__) from exc


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One TCP (or TLS) connection as an ``asyncio`` reader/writer pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            if timeout is None:
                return await self._reader.read(max_bytes)
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()

    async def aclose(self) -> None:
        # Not waiting for the close to complete: httpcore closes connections from
        # cancelled calls too, and a close must never block.
        self._writer.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore asks this of an idle keep-alive connection: readable means the
            # server closed it (or sent junk), so it must not be reused.
            return self._reader.at_eof() or self._reader.exception() is not None
        key = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
        return self._writer.get_extra_info(key)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens :class:`AsyncioStream` connections for httpcore's pool."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    limit=READ_LIMIT,
                    local_addr=(local_address, 0) if local_address else None,
                )
        sock: socket.socket | None = writer.get_extra_info("socket")
        if sock is not None:
            for option in socket_options or ():
                sock.setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=READ_LIMIT)
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def upstream_pool(*, max_connections: int, keepalive_expiry: float) -> UpstreamPool:
    """The pool chatgate talks to its upstream through: httpcore connections on
    :class:`AsyncioBackend`, certificates verified (no proxies from the environment)."""
    return UpstreamPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=max_connections,
        keepalive_expiry=keepalive_expiry,
        network_backend=AsyncioBackend(),
    )
