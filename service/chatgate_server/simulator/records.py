"""What the simulator saw and did, per request, for tests to assert on.

A record never holds the caller's API key: the ``authorization`` and ``api-key``
headers are reduced to ``had_auth``, how the key came (``auth_scheme``: ``bearer`` or
``api-key``), a
short one-way fingerprint (``key_fingerprint``, see ``keys.fingerprint``) and, when the
simulator was given named keys, the key's name (``key_name``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .scenario import Scenario

# Headers that carry credentials; recorded only as `had_auth`.
SECRET_HEADERS = frozenset({"authorization", "api-key", "proxy-authorization"})


@dataclass(slots=True)
class RequestRecord:
    """One chat-completions request and what the simulator did with it.

    ``status`` is None until response headers are sent (it stays None for ``hang``).
    ``completed``: the whole planned response was sent and ended cleanly.
    ``closed_early``: the client closed before that; ``closed_at`` is when it was seen.
    ``aborted``: the simulator cut the connection on purpose (``disconnect_after``,
    or ``stop()`` while the response was in flight).
    ``deployment`` and ``api_version``: the Azure deployment and api-version asked for
    (None in the OpenAI flavor; the deployment's model is ``model``).
    Times are ``time.monotonic()`` seconds.
    """

    spec: Scenario
    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    had_auth: bool
    attempt: int
    stream: bool
    request_id: str
    path: str
    auth_scheme: str | None = None
    key_fingerprint: str | None = None
    key_name: str | None = None
    deployment: str | None = None
    api_version: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    status: int | None = None
    content_chunks_sent: int = 0
    completed: bool = False
    closed_early: bool = False
    closed_at: float | None = None
    aborted: bool = False
    ended_at: float | None = None

    @property
    def ended(self) -> bool:
        """Whether the response is over, however it ended."""
        return self.ended_at is not None


def public_headers(headers: dict[str, str]) -> dict[str, str]:
    """The request headers minus credentials."""
    return {name: value for name, value in headers.items() if name not in SECRET_HEADERS}


class Recorder:
    """Keeps records (the newest ``limit``), per-key attempt counts and counters."""

    def __init__(self, limit: int | None = 100_000) -> None:
        # Bounded so a long benchmark does not grow memory without end.
        self._records: deque[RequestRecord] = deque(maxlen=limit)
        self._attempts: dict[str, int] = {}
        self._attempt_limit = limit or 1_000_000
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self.open_streams = 0
        self.counters: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.reset()

    def reset(self) -> None:
        """Forget records, attempts and counters (streams in flight stay counted as open)."""
        self._records.clear()
        self._attempts.clear()
        self.statuses = {}
        self.counters = dict.fromkeys(
            ("requests", "ended", "completed", "closed_early", "aborted", "records_dropped"), 0
        )
        self._notify()

    @property
    def records(self) -> list[RequestRecord]:
        """The kept records, oldest first (a new list; the records themselves are live)."""
        return list(self._records)

    def next_attempt(self, key: str) -> int:
        """Count one more attempt for ``key`` and return its number (1 for the first)."""
        attempts = self._attempts
        count = attempts.get(key, 0) + 1
        if count == 1 and len(attempts) >= self._attempt_limit:
            # Drop the oldest key: dicts keep insertion order.
            del attempts[next(iter(attempts))]
        attempts[key] = count
        return count

    def begin(self, record: RequestRecord) -> None:
        """A request has arrived and its response starts."""
        if len(self._records) == self._records.maxlen:
            self.counters["records_dropped"] += 1
        self._records.append(record)
        self.counters["requests"] += 1
        self.open_streams += 1
        self._notify()

    def sent_status(self, record: RequestRecord, status: int) -> None:
        """Response headers with ``status`` went out."""
        record.status = status
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def end(
        self,
        record: RequestRecord,
        *,
        completed: bool = False,
        closed_early: bool = False,
        aborted: bool = False,
    ) -> None:
        """The response is over; only the first call counts."""
        if record.ended_at is not None:
            return
        now = time.monotonic()
        record.ended_at = now
        record.completed = completed
        record.aborted = aborted
        if closed_early:
            record.closed_early = True
            record.closed_at = now
        counters = self.counters
        counters["ended"] += 1
        if completed:
            counters["completed"] += 1
        if closed_early:
            counters["closed_early"] += 1
        if aborted:
            counters["aborted"] += 1
        self.open_streams -= 1
        self._notify()

    def stats_json(self) -> bytes:
        """Counters and records as JSON for ``GET /_simulator/stats``."""
        return orjson.dumps(
            {
                "counters": self.counters,
                "statuses": {str(k): v for k, v in self.statuses.items()},
                "open_streams": self.open_streams,
                "requests": list(self._records),
            }
        )

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds (checked on every change). Raises TimeoutError.

        Takes a timeout (rather than leaving it to the caller's ``asyncio.timeout``) because
        it backs the test helpers ``Simulator.wait_*(…, timeout)``, which tests call bare.
        """
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await future
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _notify(self) -> None:
        if not self._waiters:
            return
        for predicate, future in list(self._waiters):
            if not future.done() and predicate():
                future.set_result(None)
