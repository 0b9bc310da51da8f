"""The asyncio client (grpc.aio)."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import grpc

from chatgate.client.channel import (
    ChannelOptions,
    PathLike,
    channel_options,
    resolve_credentials,
    resolve_token,
)
from chatgate.client.errors import ChatgateError, from_call
from chatgate.client.events import Event, event_from_proto
from chatgate.client.metadata import MetadataPairs, call_metadata
from chatgate.client.result import Collector, Completion
from chatgate.client.timeouts import DEFAULT_TIMEOUT, check_timeout, incomplete_stream
from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc


class AsyncCompletionStream:
    """The events of one ``Complete`` call, as they arrive.

    Iterate it with ``async for``. Use it as an async context manager (or call
    :meth:`cancel`) to end the call at once when you stop reading early: chatgate then
    closes the upstream stream and stops paying for tokens nobody reads.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall[pb.CompleteRequest, pb.CompleteResponse]) -> None:
        self._call = call
        self.events_received = 0
        """How many events were delivered so far."""

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        while True:
            try:
                message = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                raise from_call(exc, self.events_received) from exc
            if message is grpc.aio.EOF:
                raise StopAsyncIteration
            assert isinstance(message, pb.CompleteResponse)
            event = event_from_proto(message)
            if event is not None:  # an event kind newer than this client: skipped
                self.events_received += 1
                return event

    def cancel(self) -> None:
        """End the call now (no-op when it already ended)."""
        self._call.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class AsyncClient:
    """An asyncio chatgate client over one channel; open it once, share it, close it.

    Args:
        target: ``host:port`` (any gRPC target string, e.g. ``dns:///chatgate:50051``).
        token: the calling service's bearer token, sent as ``authorization`` metadata.
        token_file: or a file holding it (read once, here).
        credentials: TLS channel credentials (``grpc.ssl_channel_credentials(...)``);
            None for a plaintext channel.
        ca_file, cert_file, key_file: or TLS from PEM files: the CA that signed
            chatgate's certificate (None: the system's roots), and for mTLS the client's
            certificate and key.
        timeout: the deadline of each call in seconds, unless the call gives its own;
            None for no client deadline (chatgate's cap, 60 s by default, still applies).
        metadata: pairs sent with every call.
        options: extra channel arguments, applied over the keepalive defaults.
        channel: use this channel instead of creating one (it is not closed by
            :meth:`close`); ``target``, ``credentials`` and ``options`` are then ignored.
    """

    def __init__(
        self,
        target: str = "",
        *,
        token: str | None = None,
        token_file: PathLike | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        ca_file: PathLike | None = None,
        cert_file: PathLike | None = None,
        key_file: PathLike | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: MetadataPairs = (),
        options: ChannelOptions = (),
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        token = resolve_token(token, token_file)
        credentials = resolve_credentials(credentials, ca_file, cert_file, key_file)
        self._owns_channel = channel is None
        if channel is None:
            opts = channel_options(options)
            channel = (
                grpc.aio.insecure_channel(target, options=opts)
                if credentials is None
                else grpc.aio.secure_channel(target, credentials, options=opts)
            )
        self._channel = channel
        self._stub = chat_pb2_grpc.ChatServiceStub(channel)
        self._token = token
        self._timeout = check_timeout(timeout)
        self._metadata = tuple(metadata)

    def complete(
        self,
        request: pb.CompleteRequest,
        *,
        timeout: float | None = None,
        metadata: MetadataPairs = (),
    ) -> AsyncCompletionStream:
        """Start a completion and return its events as they arrive.

        ``timeout`` (seconds) is this call's deadline; None uses the client's.
        Iterating raises :class:`ChatgateError` when the call fails — after any events
        that arrived before the failure (such as the final event of a stream the
        deadline cut).
        """
        call = self._stub.Complete(
            request,
            timeout=self._timeout if timeout is None else check_timeout(timeout),
            metadata=call_metadata(self._token, self._metadata, metadata),
        )
        return AsyncCompletionStream(call)

    async def collect(
        self,
        request: pb.CompleteRequest,
        *,
        # A gRPC deadline the server sees and honours, not a local asyncio timeout.
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: MetadataPairs = (),
    ) -> Completion:
        """Run a completion to its end and return it whole.

        Raises :class:`ChatgateError` on failure, with ``partial`` holding what had
        arrived (None when nothing had).
        """
        collector = Collector()
        async with self.complete(request, timeout=timeout, metadata=metadata) as stream:
            try:
                async for event in stream:
                    collector.add(event)
            except ChatgateError as exc:
                exc.partial = collector.result() if collector.events else None
                raise
        completion = collector.result()
        if not completion.finished:
            raise incomplete_stream(collector)
        return completion

    async def close(self) -> None:
        """Close the channel (when this client created it); running calls are cancelled."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
