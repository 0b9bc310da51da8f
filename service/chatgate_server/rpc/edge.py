"""The edge: the one place every call passes through, at its start and at its end.

For every call it

- resolves the :class:`~chatgate_server.domain.Caller` of ChatService and UsageService
  calls from their credential (``rpc/authn.py``; :func:`current_caller` gives it to the
  servicers) and refuses a call without a valid one (UNAUTHENTICATED); health and
  reflection need no credential (probes and ``grpcurl list``);
- refuses what must not reach a servicer: a request over CHATGATE_MAX_REQUEST_BYTES or
  one that is not valid protobuf (INVALID_ARGUMENT naming why, never gRPC's own
  RESOURCE_EXHAUSTED or UNKNOWN), a Complete beyond CHATGATE_MAX_CONCURRENT_STREAMS or
  beyond the request bytes in flight, a health Watch beyond its caps (RESOURCE_EXHAUSTED
  with RetryInfo);
- maps every :class:`~chatgate_server.errors.ChatgateError` to its status and rich
  details, and anything unexpected to a short INTERNAL, logged once;
- sets the server span's status (chatgate's own services get a server span) and writes
  the call's access line, whatever the end.

Why a server interceptor rather than a wrapper applied to each servicer: gRPC runs it
for every method of every service, registered now or later (health and reflection
included), so no call can miss the edge because someone forgot to wrap a handler. It
wraps each method's handler once and caches it by method name, so a call costs one
dict lookup here; the messages a call writes (``context.write``) do not pass through it.

Unary requests arrive as raw bytes (the wrapped handler has no deserializer) and are
decoded here after the size and capacity checks: a refused request is never parsed,
and a decode error becomes a status instead of grpc's UNKNOWN.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.trace import INVALID_SPAN, Span

from chatgate.v1 import chat_pb2, usage_pb2
from chatgate_server import access_log
from chatgate_server.domain import ANONYMOUS_CALLER, Caller
from chatgate_server.errors import (
    ChatgateError,
    FieldViolation,
    InvalidRequest,
    RequestBytesInFlight,
    TooManyHealthWatches,
    TooManyStreams,
)
from chatgate_server.rpc.authn import Authenticator
from chatgate_server.rpc.status import to_status
from chatgate_server.rpc.tracing import server_span, set_rpc_status
from chatgate_server.telemetry import NO_TELEMETRY, Telemetry

log = logging.getLogger(__name__)

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
USAGE_SERVICE = usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name
COMPLETE = f"/{CHAT_SERVICE}/Complete"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# chatgate's own services: a server span each call, and their requests count toward
# the bytes in flight. Health and reflection get neither (probes are not traffic).
_OWN_SERVICES = (CHAT_SERVICE, USAGE_SERVICE)
# Past this, gRPC refuses a request itself (RESOURCE_EXHAUSTED, before reading it):
# far enough above the limit that an oversized request gets our INVALID_ARGUMENT.
MIN_RECEIVE_CEILING = 16 * 1024 * 1024

_caller: ContextVar[Caller] = ContextVar("chatgate_caller")

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_request_bytes: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 4096
    max_request_bytes_in_flight: int = 64 * 1024 * 1024
    max_health_watches: int = 1024
    max_health_watches_per_connection: int = 16

    @property
    def receive_ceiling(self) -> int:
        """grpc.max_receive_message_length: requests between the limit and this get
        INVALID_ARGUMENT from the edge; only beyond it does gRPC refuse on its own."""
        return max(4 * self.max_request_bytes, MIN_RECEIVE_CEILING)


def current_caller() -> Caller:
    """The caller of the call running in this context, as the edge resolved it."""
    return _caller.get()


@dataclass(frozen=True, slots=True)
class _Method:
    """What the edge knows of one method, worked out once when its handler is wrapped."""

    name: str  # /package.Service/Method
    service: str
    short: str  # the method's own name
    decode: Callable[[bytes], Any] | None  # None: streaming requests, decoded by gRPC
    message: str  # the request message's name, for errors
    own: bool  # one of chatgate's services: traced, counted in the bytes in flight

    @classmethod
    def of(cls, name: str, deserialize: Callable[[bytes], Any] | None, *, streamed: bool) -> _Method:
        _, service, short = name.split("/")
        decode = None if streamed else deserialize or _identity
        message = _message_name(deserialize, name)
        return cls(name, service, short, decode, message, service in _OWN_SERVICES)


class Edge(grpc.aio.ServerInterceptor):
    """Every call's way in and out; holds the per-process call limits."""

    def __init__(
        self,
        limits: EdgeLimits,
        telemetry: Telemetry = NO_TELEMETRY,
        authenticator: Authenticator | None = None,
        refusals: Callable[[Caller, str, str], None] | None = None,
    ) -> None:
        """``authenticator`` defaults to none at all: every call anonymous (CHATGATE_AUTH=off).
        ``refusals`` is told (caller, status name, reason) of each call of a known caller
        refused without a usage row (the abuse detector's counts: limits/anomaly_counts.py)."""
        self.limits = self._limits = limits
        self._refusals = refusals
        self._telemetry = telemetry
        self._auth = authenticator or Authenticator(None, telemetry=telemetry)
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self.streams = 0
        self.bytes_in_flight = 0
        self.watches = 0
        self._watches_by_peer: dict[str, int] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = details.method
        handler = self._handlers.get(method)
        if handler is None:
            inner = await continuation(details)
            if inner is None:
                return None  # an unknown method: gRPC answers UNIMPLEMENTED (and is not cached)
            handler = self._handlers[method] = self._wrap(method, inner)
        return handler

    # --- wrapping one method's handler -----------------------------------------------

    def _wrap(self, name: str, inner: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        serialize = inner.response_serializer
        if inner.request_streaming:
            # Reflection: messages are read by the handler; a bad one raises InvalidRequest there.
            method = _Method.of(name, inner.request_deserializer, streamed=True)
            deserialize = _checked(inner.request_deserializer, method.message)
            if inner.response_streaming:
                stream_stream = _as_coroutine(inner.stream_stream)

                async def streams(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                    await self._call(method, requests, context, stream_stream)

                return grpc.stream_stream_rpc_method_handler(streams, deserialize, serialize)
            stream_unary = cast(Handler, inner.stream_unary)

            async def stream_in(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                return await self._call(method, requests, context, stream_unary)

            return grpc.stream_unary_rpc_method_handler(stream_in, deserialize, serialize)
        method = _Method.of(name, inner.request_deserializer, streamed=False)
        if inner.response_streaming:
            unary_stream = _as_coroutine(inner.unary_stream)

            async def stream_out(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                await self._call(method, raw, context, unary_stream)

            return grpc.unary_stream_rpc_method_handler(stream_out, None, serialize)
        unary_unary = cast(Handler, inner.unary_unary)

        async def unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await self._call(method, raw, context, unary_unary)

        return grpc.unary_unary_rpc_method_handler(unary, None, serialize)

    # --- one call ----------------------------------------------------------------------

    async def _call(
        self, method: _Method, request: Any, context: grpc.aio.ServicerContext[Any, Any], handler: Handler
    ) -> Any:
        # Until the credential is checked (inside the try, so that a refusal gets its
        # status, span status and access line like any other) the line names no caller.
        line, line_token = access_log.open_line(method.name, None if method.own else ANONYMOUS_CALLER)
        caller_token = None
        code, reason = grpc.StatusCode.OK, None
        refusal: grpc.Status | None = None
        release: Callable[[], None] | None = None
        spanned = server_span(self._telemetry, context, method.service, method.short) if method.own else None
        with spanned or nullcontext(INVALID_SPAN) as span:
            try:
                if method.own:
                    line.caller = caller = self._auth.resolve(context)
                    caller_token = _caller.set(caller)
                    _describe(span, caller)
                elif method.name == HEALTH_CHECK:
                    self._auth.health_checked()
                if method.decode is not None:
                    release = self._admit(method, len(request), context)
                    request = _decode(method, request)
                result = await handler(request, context)
                code = context.code() or grpc.StatusCode.OK
                return result
            except ChatgateError as exc:
                refusal = to_status(exc)
                code, reason = refusal.code, exc.reason
            except asyncio.CancelledError:
                # The caller left (or its deadline ran out): not an error of ours.
                code = grpc.StatusCode.CANCELLED
                span.set_attribute("chatgate.outcome", "cancelled")
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN  # a handler aborted on its own
                raise
            except Exception:
                # Logged once, here, with the trace id; the caller learns nothing of it.
                log.exception("unexpected error in %s", method.name)
                refusal = to_status(ChatgateError("internal error"))
                code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
            finally:
                if release is not None:
                    release()
                set_rpc_status(span, code, reason)
                # A refusal with a usage row is counted from the row, by the detector.
                if reason is not None and self._refusals and line.caller and line.record is None:
                    self._refusals(line.caller, code.name, reason)
                access_log.close_line(line, line_token, code.name, reason)
                if caller_token is not None:
                    _caller.reset(caller_token)
        # Sent once the span has ended and the access line is written: whoever sees the
        # status can already find both. (Only a refusal gets here: the rest returned or raised.)
        assert refusal is not None
        await context.abort_with_status(refusal)
        raise AssertionError("unreachable: abort_with_status raises")

    def _admit(
        self, method: _Method, size: int, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Callable[[], None] | None:
        """Refuse what must not run; take what a running call holds. Returns its release."""
        limits = self._limits
        if size > limits.max_request_bytes:
            raise InvalidRequest(
                [
                    FieldViolation(
                        "", f"the request is {size} bytes; the limit is {limits.max_request_bytes} bytes"
                    )
                ]
            )
        if method.name == COMPLETE:
            if self.streams >= limits.max_concurrent_streams:
                raise TooManyStreams(
                    f"this replica is running its limit of {limits.max_concurrent_streams} completions; "
                    "retry shortly or on another replica"
                )
            self.streams += 1
            self._telemetry.active_streams.add(1)
            if not self._take_bytes(size):
                self._end_stream()
                raise RequestBytesInFlight(
                    "this replica holds its limit of request bytes in flight; retry shortly"
                )
            return lambda: self._end_stream(size)
        if method.own:
            if not self._take_bytes(size):
                raise RequestBytesInFlight(
                    "this replica holds its limit of request bytes in flight; retry shortly"
                )
            return lambda: self._give_bytes(size)
        if method.name == HEALTH_WATCH:
            return self._take_watch(context.peer())
        return None

    def _take_bytes(self, size: int) -> bool:
        if self.bytes_in_flight + size > self._limits.max_request_bytes_in_flight:
            return False
        self.bytes_in_flight += size
        return True

    def _give_bytes(self, size: int) -> None:
        self.bytes_in_flight -= size

    def _end_stream(self, size: int = 0) -> None:
        self.streams -= 1
        self.bytes_in_flight -= size
        self._telemetry.active_streams.add(-1)

    def _take_watch(self, peer: str) -> Callable[[], None]:
        limits = self._limits
        on_peer = self._watches_by_peer.get(peer, 0)
        if self.watches >= limits.max_health_watches:
            raise TooManyHealthWatches(
                f"this replica serves at most {limits.max_health_watches} health watches"
            )
        if on_peer >= limits.max_health_watches_per_connection:
            raise TooManyHealthWatches(
                f"at most {limits.max_health_watches_per_connection} health watches per connection"
            )
        self.watches += 1
        self._watches_by_peer[peer] = on_peer + 1

        def release() -> None:
            self.watches -= 1
            left = self._watches_by_peer[peer] - 1
            if left:
                self._watches_by_peer[peer] = left
            else:
                del self._watches_by_peer[peer]

        return release


def _describe(span: Span, caller: Caller) -> None:
    """Who called, on the server span: the credential's public id, never the credential."""
    if span.is_recording():
        span.set_attribute("chatgate.tenant", caller.tenant)
        span.set_attribute("chatgate.caller", caller.service)
        if caller.credential_id:
            span.set_attribute("chatgate.credential_id", caller.credential_id)


def _decode(method: _Method, raw: bytes) -> Any:
    assert method.decode is not None
    try:
        return method.decode(raw)
    except (DecodeError, RecursionError):
        raise _undecodable(method.message) from None


def _undecodable(message: str) -> InvalidRequest:
    return InvalidRequest(
        [
            FieldViolation(
                "",
                f"not a valid {message}: corrupt protobuf, a string that is not UTF-8, "
                "or nesting deeper than protobuf allows",
            )
        ]
    )


def _message_name(deserialize: Callable[[bytes], Any] | None, method: str) -> str:
    """``CompleteRequest`` for ``CompleteRequest.FromString``; the method's name otherwise."""
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "name", None)
    return name if isinstance(name, str) else f"{method.rsplit('/', 1)[-1]} request"


def _checked(deserialize: Callable[[bytes], Any] | None, message: str) -> Callable[[bytes], Any]:
    """A streamed request's deserializer that fails with INVALID_ARGUMENT, not UNKNOWN."""
    decode = deserialize or _identity

    def checked(raw: bytes) -> Any:
        try:
            return decode(raw)
        except (DecodeError, RecursionError):
            raise _undecodable(message) from None

    return checked


def _identity(raw: bytes) -> bytes:
    return raw


def _as_coroutine(handler: Any) -> Handler:
    """A streaming handler as a coroutine that writes its responses itself (grpc.aio's
    reader-writer form), whether it is one already or an async generator."""
    if inspect.iscoroutinefunction(handler):
        return handler  # type: ignore[no-any-return]
    if inspect.isasyncgenfunction(handler):

        async def writes(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            async for response in handler(request, context):
                await context.write(response)

        return writes
    raise TypeError(f"{handler!r}: only async handlers are served")
