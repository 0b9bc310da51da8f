"""The blocking client (grpc's sync API), for code that has no event loop."""

from __future__ import annotations

from collections.abc import Iterator
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


class CompletionStream:
    """The events of one ``Complete`` call, as they arrive (blocking iteration).

    Use it as a context manager (or call :meth:`cancel`) to end the call at once when
    you stop reading early.
    """

    def __init__(self, call: grpc._CallIterator[pb.CompleteResponse]) -> None:
        self._call = call
        self.events_received = 0
        """How many events were delivered so far."""

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        while True:
            try:
                message = next(self._call)
            except grpc.RpcError as exc:
                if not isinstance(exc, grpc.Call):  # grpc's errors from a call always are
                    raise
                raise from_call(exc, self.events_received) from exc
            event = event_from_proto(message)
            if event is not None:  # an event kind newer than this client: skipped
                self.events_received += 1
                return event

    def cancel(self) -> None:
        """End the call now (no-op when it already ended)."""
        self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class Client:
    """A blocking chatgate client over one channel; the arguments are :class:`AsyncClient`'s."""

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
        channel: grpc.Channel | None = None,
    ) -> None:
        token = resolve_token(token, token_file)
        credentials = resolve_credentials(credentials, ca_file, cert_file, key_file)
        self._owns_channel = channel is None
        if channel is None:
            opts = channel_options(options)
            channel = (
                grpc.insecure_channel(target, options=opts)
                if credentials is None
                else grpc.secure_channel(target, credentials, options=opts)
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
    ) -> CompletionStream:
        """Start a completion and return its events as they arrive; see AsyncClient.complete."""
        call = self._stub.Complete(
            request,
            timeout=self._timeout if timeout is None else check_timeout(timeout),
            metadata=call_metadata(self._token, self._metadata, metadata),
        )
        return CompletionStream(call)

    def collect(
        self,
        request: pb.CompleteRequest,
        *,
        timeout: float | None = None,
        metadata: MetadataPairs = (),
    ) -> Completion:
        """Run a completion to its end and return it whole; see AsyncClient.collect."""
        collector = Collector()
        with self.complete(request, timeout=timeout, metadata=metadata) as stream:
            try:
                for event in stream:
                    collector.add(event)
            except ChatgateError as exc:
                exc.partial = collector.result() if collector.events else None
                raise
        completion = collector.result()
        if not completion.finished:
            raise incomplete_stream(collector)
        return completion

    def close(self) -> None:
        """Close the channel (when this client created it)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
