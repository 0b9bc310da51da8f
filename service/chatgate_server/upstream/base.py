"""What the completion service needs from an upstream: open a stream, read events, close."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from chatgate_server.deadline import Deadline
from chatgate_server.domain import CompletionRequest, UpstreamEvent


class UpstreamStream(Protocol):
    """An established upstream response (HTTP 200 received)."""

    def events(self) -> AsyncIterator[UpstreamEvent]:
        """The stream's events as they arrive; ends after the last one."""
        ...

    async def aclose(self) -> None:
        """Close the response now: no further bytes are read (or paid for)."""
        ...


class Upstream(Protocol):
    """A chat-completions provider."""

    @property
    def name(self) -> str:
        """The kind of provider, as ``gen_ai.provider.name`` (e.g. "openai")."""
        ...

    async def open(self, request: CompletionRequest, deadline: Deadline) -> UpstreamStream:
        """Send the request; return once the response has started.

        The adapter builds its own body, URL and auth header from ``request``, whose
        ``model`` is already the name this upstream knows the model by.

        Raises an :class:`~chatgate_server.errors.UpstreamError` subclass when the
        upstream answers with an error or cannot be reached.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
