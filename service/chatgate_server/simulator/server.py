"""``Simulator``: start and stop the server, and what tests read from it."""

from __future__ import annotations

import asyncio

from .app import SimulatorApp
from .connection import Connection
from .records import Recorder, RequestRecord

DEFAULT_CHUNKS = 12


class Simulator:
    """An OpenAI-compatible chat-completions server on a local port, with fault scenarios.

    Usable in-process from tests (``await start()``, read ``requests``, ``await stop()``)
    or through ``python -m chatgate_server.simulator``.
    """

    def __init__(
        self,
        *,
        chunks: int = DEFAULT_CHUNKS,
        delay_ms: int = 0,
        record_limit: int | None = 100_000,
        any_model: bool = False,
    ) -> None:
        """``chunks``/``delay_ms``: defaults when a request's scenario does not set them.
        ``record_limit``: how many records to keep (oldest dropped first; None: all).
        ``any_model``: serve every model name, not only those in ``models.CONTEXT_WINDOWS``.
        """
        self._recorder = Recorder(record_limit)
        self._app = SimulatorApp(self._recorder, chunks=chunks, delay_ms=delay_ms, any_model=any_model)
        self._connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self._host = ""
        self._port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (port 0 picks a free one; see ``port``)."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        loop = asyncio.get_running_loop()
        self._app.stopping = False
        self._server = await loop.create_server(
            lambda: Connection(self._app.dispatch, self._connections),
            host,
            port,
            backlog=1024,
            reuse_address=True,
        )
        sockname = self._server.sockets[0].getsockname()
        self._host, self._port = host, int(sockname[1])

    async def stop(self) -> None:
        """Stop listening, cut every open connection and wait for the stream tasks to end."""
        server, self._server = self._server, None
        if server is None:
            return
        self._app.stopping = True
        server.close()
        for conn in list(self._connections):
            conn.abort()
        tasks = list(self._app.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Simulator:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (after ``start``)."""
        return self._port

    @property
    def root_url(self) -> str:
        """``http://host:port`` without the ``/v1`` prefix."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ``http://host:port/v1``."""
        return f"{self.root_url}/v1"

    @property
    def requests(self) -> list[RequestRecord]:
        """Records of the chat-completions requests, in arrival order (a fresh list)."""
        return self._recorder.records

    @property
    def open_streams(self) -> int:
        """Responses in flight: streaming, stalled, delayed or hanging."""
        return self._recorder.open_streams

    @property
    def counters(self) -> dict[str, int]:
        """Counts since start/reset: requests, ended, completed, closed_early, aborted, …"""
        return dict(self._recorder.counters)

    def reset(self) -> None:
        """Forget records, attempt counts and counters (same as ``POST /_simulator/reset``)."""
        self._recorder.reset()

    async def wait_closed(self, n: int = 1, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until at least ``n`` responses have ended (any way) since start/reset."""
        await self._recorder.wait_until(lambda: self._recorder.counters["ended"] >= n, timeout)

    async def wait_requests(self, n: int = 1, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until at least ``n`` chat-completions requests have arrived since start/reset."""
        await self._recorder.wait_until(lambda: self._recorder.counters["requests"] >= n, timeout)

    async def wait_idle(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until no response is in flight (``open_streams == 0``)."""
        await self._recorder.wait_until(lambda: self._recorder.open_streams == 0, timeout)
