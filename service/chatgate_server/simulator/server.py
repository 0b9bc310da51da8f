"""``Simulator``: start and stop the server, and what tests read from it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from .app import SimulatorApp
from .azure import API_VERSIONS
from .connection import Connection
from .flavor import AzureFlavor, Flavor, FlavorName, OpenAIFlavor
from .keys import KeyRing
from .models import context_window
from .ratelimit import (
    DEFAULT_LIMIT_REQUESTS,
    DEFAULT_LIMIT_TOKENS,
    DEFAULT_WINDOW_S,
    Headroom,
    RateBudget,
)
from .records import Recorder, RequestRecord

DEFAULT_CHUNKS = 12


class Simulator:
    """An OpenAI-compatible (or Azure OpenAI) chat-completions server on a local port,
    with fault scenarios and a scriptable rate-limit budget.

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
        flavor: FlavorName = "openai",
        deployments: Mapping[str, str] | None = None,
        api_versions: Iterable[str] | None = None,
        keys: Mapping[str, str] | None = None,
        scenario: str = "",
        limit_requests: int = DEFAULT_LIMIT_REQUESTS,
        limit_tokens: int = DEFAULT_LIMIT_TOKENS,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        """``chunks``/``delay_ms``: defaults when a request's scenario does not set them.
        ``record_limit``: how many records to keep (oldest dropped first; None: all).
        ``any_model``: serve every model name, not only those in ``models.CONTEXT_WINDOWS``.
        ``flavor``: ``"openai"`` or ``"azure"`` (Azure's URLs, ``api-key``, bodies, chunks).
        ``deployments``: Azure deployment name → model (default: each model under its name).
        ``api_versions``: the Azure api-versions served (default: ``azure.API_VERSIONS``).
        ``keys``: name → key; when given, only these keys are accepted, and records name them.
        ``scenario``: a spec every request gets (its own items win a repeated key).
        ``limit_requests``/``limit_tokens``/``window_s``: the rate-limit budget (``ratelimit``).
        Raises ValueError for a bad option.
        """
        self._recorder = Recorder(record_limit)
        self._app = SimulatorApp(
            self._recorder,
            chunks=chunks,
            delay_ms=delay_ms,
            any_model=any_model,
            flavor=_flavor(flavor, deployments, api_versions, any_model=any_model),
            keys=KeyRing(keys),
            budget=RateBudget(limit_requests=limit_requests, limit_tokens=limit_tokens, window_s=window_s),
        )
        self._app.set_scenario(scenario)
        self._connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self._host = ""
        self._port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (port 0 picks a free one; see ``port``)."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        loop = asyncio.get_running_loop()
        self._app.sender.stopping = False
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
        self._app.sender.stopping = True
        server.close()
        for conn in list(self._connections):
            conn.abort()
        tasks = list(self._app.sender.tasks)
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
    def azure_endpoint(self) -> str:
        """The Azure resource endpoint (``http://host:port``): classic URLs hang below it."""
        return self.root_url

    @property
    def azure_v1_base_url(self) -> str:
        """The Azure v1 API's base URL, ``http://host:port/openai/v1``."""
        return f"{self.root_url}/openai/v1"

    @property
    def flavor(self) -> FlavorName:
        """``"openai"`` or ``"azure"``."""
        return self._app.flavor.name

    @property
    def headroom(self) -> Headroom:
        """The rate-limit budget now: limits, remaining, ms until full."""
        return self._app.budget.headroom()

    def set_headroom(
        self,
        *,
        limit_requests: int | None = None,
        limit_tokens: int | None = None,
        remaining_requests: int | None = None,
        remaining_tokens: int | None = None,
        window_s: float | None = None,
    ) -> Headroom:
        """Script the budget (same as ``POST /_simulator/ratelimit``). Raises ValueError.

        E.g. ``set_headroom(limit_requests=20, window_s=3600)``: 20 requests, then 429s,
        refilling one request every three minutes."""
        return self._app.budget.set(
            limit_requests=limit_requests,
            limit_tokens=limit_tokens,
            remaining_requests=remaining_requests,
            remaining_tokens=remaining_tokens,
            window_s=window_s,
        )

    def set_scenario(self, spec: str) -> None:
        """Give every request this scenario from now on ("" clears it). Raises ScenarioError."""
        self._app.set_scenario(spec)

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


def _flavor(
    name: FlavorName,
    deployments: Mapping[str, str] | None,
    api_versions: Iterable[str] | None,
    *,
    any_model: bool,
) -> Flavor:
    if name == "openai":
        if deployments is not None or api_versions is not None:
            raise ValueError("deployments and api_versions are Azure options (flavor='azure')")
        return OpenAIFlavor()
    if name != "azure":
        raise ValueError(f"unknown simulator flavor {name!r}")
    for deployment, model in (deployments or {}).items():
        if not deployment or "/" in deployment or context_window(model, any_model=any_model) is None:
            raise ValueError(f"deployment {deployment!r}: model {model!r} is not served (see --any-model)")
    versions = frozenset(api_versions) if api_versions is not None else API_VERSIONS
    return AzureFlavor(
        deployments=dict(deployments) if deployments is not None else None,
        api_versions=versions,
        any_model=any_model,
    )
