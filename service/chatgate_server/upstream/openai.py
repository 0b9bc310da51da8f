"""The OpenAI chat-completions upstream, over httpcore and our connection pool.

This module (with its Azure variant, ``azure.py``) is the only one that talks HTTP.
It maps every httpcore exception to an :class:`~chatgate_server.errors.UpstreamError`
in one place (``_translate``), so nothing above it sees a foreign exception.

Timeouts: httpcore's are per phase (connect, write, pool) and per read; they are bounded
here by the request's deadline, and the total is enforced by the caller's
``asyncio.timeout`` on the deadline, never by httpcore.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpcore
import orjson

from chatgate_server.config import Secret
from chatgate_server.deadline import Deadline
from chatgate_server.domain import CompletionRequest, UpstreamEvent
from chatgate_server.errors import UpstreamError, UpstreamProtocolError
from chatgate_server.upstream.chunks import ChunkDecoder
from chatgate_server.upstream.classify import classify_http_error
from chatgate_server.upstream.coalesce import coalesce
from chatgate_server.upstream.headroom import Headroom
from chatgate_server.upstream.request_body import build_body
from chatgate_server.upstream.sse import SSEDecoder
from chatgate_server.upstream.transport import upstream_pool

log = logging.getLogger(__name__)

# Error bodies are small JSON documents; never read an unbounded one.
_MAX_ERROR_BODY = 64 * 1024
# How long to wait for the end of a body after [DONE] before giving up on reusing it.
_FINISH_BODY_S = 1.0


class OpenAIUpstream:
    """``POST {base_url}/chat/completions`` with ``stream: true``, key as ``Bearer``.

    Subclasses (``azure.py``) change where a request goes and how the key is sent:
    :meth:`_target` and :meth:`_auth_headers`. The key never leaves this object but in
    the header to this one origin (redirects are never followed).
    """

    provider = "openai"
    """``gen_ai.provider.name`` of this kind of upstream."""

    def __init__(
        self,
        base_url: str,
        api_key: Secret | None,
        *,
        connect_timeout: float = 5.0,
        max_connections: int = 1000,
        coalesce_deltas: bool = True,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._coalesce = coalesce_deltas
        parts = urlsplit(base_url)
        self.server_address = parts.hostname or ""
        self.server_port = parts.port or (443 if parts.scheme == "https" else 80)
        self._connect_timeout = connect_timeout
        # Requests go to our pool as httpcore requests, built from parts made once
        # here: httpx's Request and Response models (header normalisation, URL
        # merging, content streams) cost ~150 µs before the response headers, and
        # its client's cookie jar, auth and redirect layers did nothing here
        # (redirects are never followed: a 3xx is an error, so our key never goes to
        # another host). bench/http_clients.py measures the difference.
        self._scheme = parts.scheme.encode()
        self._port = parts.port
        self._base_path = parts.path.rstrip("/")
        self._url = self._url_for(f"{self._base_path}/chat/completions")
        host = parts.netloc.rsplit("@", 1)[-1].encode()
        self._headers = [
            (b"host", host),
            *self._auth_headers(api_key),
            *((name.lower().encode(), value.encode()) for name, value in extra_headers),
            (b"content-type", b"application/json"),
            (b"accept", b"text/event-stream"),
        ]
        self._pool = upstream_pool(max_connections=max_connections, keepalive_expiry=30.0)
        self.headroom = Headroom()
        """This deployment's rate-limit headroom, from the headers of its responses."""

    @property
    def name(self) -> str:
        return self.provider

    def _auth_headers(self, api_key: Secret | None) -> list[tuple[bytes, bytes]]:
        """How the key is sent (none at all for a server that takes no key)."""
        return [] if api_key is None else [(b"authorization", f"Bearer {api_key.value}".encode())]

    def _url_for(self, target: str) -> httpcore.URL:
        return httpcore.URL(
            scheme=self._scheme, host=self.server_address.encode(), port=self._port, target=target.encode()
        )

    def _target(self, request: CompletionRequest) -> httpcore.URL:
        """Where ``request`` goes (the same URL for every model here)."""
        return self._url

    def _body(self, request: CompletionRequest) -> bytes:
        """The JSON body. Built per attempt, not cached: retries are rare and the body
        costs far less than the round trip they wait for."""
        return build_body(request)

    async def open(self, request: CompletionRequest, deadline: Deadline) -> OpenAIStream:
        body = self._body(request)
        remaining = deadline.remaining()
        timeout = {
            "connect": min(self._connect_timeout, remaining),
            "read": remaining,
            "write": remaining,
            "pool": remaining,
        }
        headers = [
            *self._headers,
            (b"content-length", str(len(body)).encode()),
            (b"x-client-request-id", request.request_id.encode()),
        ]
        http_request = httpcore.Request(
            b"POST", self._target(request), headers=headers, content=body, extensions={"timeout": timeout}
        )
        try:
            response = await self._pool.handle_async_request(http_request)
        except _TRANSPORT_ERRORS as exc:
            raise _translate(exc) from None
        self.headroom.observe(response.headers, response.status)
        if response.status != 200:
            try:
                await _raise_for_error(response)
            finally:
                await response.aclose()
        return OpenAIStream(response, coalesce_deltas=self._coalesce)

    @property
    def open_connections(self) -> int:
        """Upstream connections open now, idle ones included (0 some seconds after load)."""
        return self._pool.connections

    async def aclose(self) -> None:
        await self._pool.aclose()


class OpenAIStream:
    """An open streaming response; iterate :meth:`events`, then :meth:`aclose`."""

    def __init__(self, response: httpcore.Response, *, coalesce_deltas: bool = True) -> None:
        self._response = response
        self._coalesce = coalesce_deltas
        self.upstream_request_id = _header(response, b"x-request-id")

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        """Each read's events in order; with ``coalesce_deltas``, the deltas that one
        read brought merged (upstream/coalesce.py). Nothing waits for more to merge."""
        sse = SSEDecoder()
        chunks = ChunkDecoder()
        merge = coalesce if self._coalesce else _as_is
        body = self._response.aiter_stream()
        started = False
        try:
            async for raw in body:
                payloads = sse.feed(raw)
                if not started and payloads:
                    # The first chunk alone, before the rest of its read is decoded: the
                    # caller's first event waits for nothing else.
                    for event in chunks.decode(payloads[0]):
                        yield event
                    started = True
                    del payloads[0]
                if len(payloads) == 1:
                    # The usual read once tokens come apart: one event, nothing to merge.
                    for event in chunks.decode(payloads[0]):
                        yield event
                else:
                    for event in merge(_decode_all(chunks, payloads)):
                        yield event
                if chunks.done:
                    await _finish_body(body)
                    return
            for event in merge(_decode_all(chunks, sse.flush())):
                yield event
        except _TRANSPORT_ERRORS as exc:
            raise _translate(exc) from None
        except _DecodedThenFailed as failed:
            # What the read held before the bad payload still reaches the caller.
            for event in merge(failed.events):
                yield event
            raise failed.error from None
        if not chunks.done:
            raise UpstreamProtocolError("the upstream stream ended without [DONE]")

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> OpenAIStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class _DecodedThenFailed(Exception):
    """A read's payload failed to decode after earlier ones in the same read had."""

    def __init__(self, events: list[UpstreamEvent], error: UpstreamError) -> None:
        self.events = events
        self.error = error


def _decode_all(chunks: ChunkDecoder, payloads: list[str]) -> list[UpstreamEvent]:
    events: list[UpstreamEvent] = []
    for payload in payloads:
        try:
            events += chunks.decode(payload)
        except UpstreamError as exc:
            if not events:
                raise
            raise _DecodedThenFailed(events, exc) from None
    return events


def _as_is(events: list[UpstreamEvent]) -> list[UpstreamEvent]:
    return events


async def _finish_body(body: AsyncIterator[bytes]) -> None:
    """Read what follows ``[DONE]`` (normally just the end of the chunked body).

    An HTTP/1.1 response closed before its end cannot be reused, so stopping at
    ``[DONE]`` would cost a new connection (a TCP and TLS handshake) per request; the
    openai SDK reads to the end for the same reason. The end comes with ``[DONE]``
    from a well-behaved upstream; one that dawdles or sends more is cut after a short
    wait (its connection is then closed rather than reused).
    """
    with contextlib.suppress(TimeoutError, *_TRANSPORT_ERRORS):
        async with asyncio.timeout(_FINISH_BODY_S):
            read = 0
            async for piece in body:
                read += len(piece)
                if read > _MAX_ERROR_BODY:
                    break


async def _raise_for_error(response: httpcore.Response) -> None:
    raw = b""
    try:
        async for piece in response.aiter_stream():
            raw += piece
            if len(raw) > _MAX_ERROR_BODY:
                break
    except _TRANSPORT_ERRORS:
        pass  # the status alone still classifies the error
    body: Any = None
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
    raise classify_http_error(response.status, body, headers)


def _header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


# What httpcore raises for a request that fails on the way (httpcore has no common base).
_TRANSPORT_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
)


def _translate(exc: Exception) -> UpstreamError:
    """One place that maps httpcore's exceptions; the message never includes a URL or header."""
    if isinstance(exc, httpcore.ConnectTimeout):
        return UpstreamError("timed out connecting to the upstream")
    if isinstance(exc, httpcore.ReadTimeout):
        return UpstreamError("the upstream stopped sending")
    if isinstance(exc, httpcore.TimeoutException):
        return UpstreamError("timed out talking to the upstream")
    if isinstance(exc, httpcore.ConnectError):
        return UpstreamError("could not connect to the upstream")
    if isinstance(exc, httpcore.RemoteProtocolError):
        return UpstreamError("the upstream closed the connection mid-response")
    if isinstance(exc, httpcore.NetworkError):
        return UpstreamError("network error talking to the upstream")
    log.warning("unexpected upstream transport error: %s", type(exc).__name__)
    return UpstreamError("error talking to the upstream")
