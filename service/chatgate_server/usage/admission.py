"""Caller-supplied request ids: a retry is let through, a reuse is refused.

The usage row is keyed by the request id, so an id must mean one request. When the
caller supplies ``request_id`` (an idempotency key), chatgate remembers a fingerprint
of the request's content with it, and at admission:

- the same id, **different content** → ALREADY_EXISTS ("reused for another request"),
  never silently merged into the earlier row;
- the same id, same content, and the earlier attempt **sent the caller nothing** (it
  failed or was cancelled before the first event) → admitted: this is the caller's
  retry, which gRPC retry policies and hand-written retry loops must be able to make;
- the same id, same content, and the earlier attempt **served the caller** (the first
  event went out) → ALREADY_EXISTS: the request happened and was billed; chatgate
  cannot replay its answer, and running it again would bill it twice;
- the same id while an attempt with it is still running → ALREADY_EXISTS.

What happens to the row of the attempt that sent nothing: the retry's row *supersedes*
it, so "one row per request id" still holds (:func:`~chatgate_server.usage.store.settle_attempts`
does this when the rows are written, in either arrival order, spool replays included).
The earlier attempt's estimated input tokens go with it: an attempt that failed before
its first chunk is normally not billed upstream, and the row that stays is the one
whose usage the upstream reported. The alternative — one row per attempt — would break
the key every report and quota check counts by.

Where the earlier attempts are looked up: first in this process's memory (in flight,
and recently finished: covers rows still in the ledger's queue or spool), then in
Postgres within the idempotency window. Generated ids (no ``request_id`` in the call)
are unique by construction and skip all of this: no Postgres round trip on that path.
When Postgres is unreachable or slow the lookup is skipped (fail open: serving beats
refusing a probably-fine retry); the write-time settlement still keeps one row unless
two served attempts raced, in which case both rows stay and a warning is logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from chatgate_server.domain import CompletionRequest, UsageRecord
from chatgate_server.errors import DuplicateRequest
from chatgate_server.usage.store import StoredAttempt

log = logging.getLogger(__name__)

# What identifies a request's content: everything but the id itself.
_NOT_CONTENT = frozenset({"request_id", "request_id_from_caller"})

Lookup = Callable[[str, datetime], Awaitable[Sequence[StoredAttempt]]]


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")


def fingerprint(request: CompletionRequest) -> str:
    """A 128-bit hash of the request's content (caller, model, messages, options, tags).

    Canonical: the same request built twice hashes the same; any field that changes
    what the upstream is asked or whom it is billed to changes the hash.
    """
    content = {
        f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name not in _NOT_CONTENT
    }
    data = orjson.dumps(content, default=_plain, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).digest()[:16].hex()


@dataclass(slots=True)
class _Finished:
    fingerprint: str
    served: bool
    at: float


class RequestIdGuard:
    """Admission check and bookkeeping for caller-supplied request ids."""

    def __init__(
        self,
        lookup: Lookup,
        *,
        window: timedelta,
        lookup_timeout_s: float = 1.0,
        remember: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``lookup(request_id, since)`` returns the stored attempts (``UsageStore.find_attempts``).
        ``remember``: how many finished ids to keep in memory."""
        self._lookup = lookup
        self._window = window
        self._lookup_timeout_s = lookup_timeout_s
        self._remember = remember
        self._clock = clock
        self._in_flight: dict[str, str] = {}
        self._finished: OrderedDict[str, _Finished] = OrderedDict()
        self.lookups_skipped = 0

    async def admit(self, request: CompletionRequest, *, consult_database: bool = True) -> None:
        """Raise DuplicateRequest if ``request`` may not run under its id; else mark it in flight."""
        if not request.request_id_from_caller:
            return
        request_id = request.request_id
        fp = fingerprint(request)
        if request_id in self._in_flight:
            raise DuplicateRequest(f"request_id {request_id!r} is in use by a call still in progress")
        seen = self._recent(request_id)
        if seen is not None:
            self._check(request_id, fp, [(seen.fingerprint, seen.served)])
        elif consult_database:
            # Placeholder first: a concurrent call with this id must not pass while we wait.
            self._in_flight[request_id] = fp
            try:
                stored = await self._stored(request_id)
                self._check(request_id, fp, [(a.fingerprint, a.served) for a in stored])
            except BaseException:
                del self._in_flight[request_id]
                raise
        else:
            self.lookups_skipped += 1
        self._in_flight[request_id] = fp

    def finished(self, record: UsageRecord) -> UsageRecord:
        """The call with ``record.request_id`` ended: remember how, and put the request's
        fingerprint on its record (None for generated ids)."""
        fp = self._in_flight.pop(record.request_id, None)
        if fp is None:
            return record
        self._finished[record.request_id] = _Finished(fp, record.resolved_model is not None, self._clock())
        self._finished.move_to_end(record.request_id)
        while len(self._finished) > self._remember:
            self._finished.popitem(last=False)
        return dataclasses.replace(record, request_fingerprint=fp)

    def _recent(self, request_id: str) -> _Finished | None:
        seen = self._finished.get(request_id)
        if seen is not None and self._clock() - seen.at > self._window.total_seconds():
            del self._finished[request_id]
            return None
        return seen

    async def _stored(self, request_id: str) -> Sequence[StoredAttempt]:
        since = datetime.now(UTC) - self._window
        try:
            async with asyncio.timeout(self._lookup_timeout_s):
                return await self._lookup(request_id, since)
        except Exception as exc:  # noqa: BLE001 - fail open, see the module docstring
            self.lookups_skipped += 1
            log.warning(
                "request id lookup skipped (%s): admitting %r without checking Postgres",
                type(exc).__name__,
                request_id,
            )
            return []

    @staticmethod
    def _check(request_id: str, fp: str, earlier: Sequence[tuple[str | None, bool]]) -> None:
        for earlier_fp, served in earlier:
            if earlier_fp != fp:
                raise DuplicateRequest(
                    f"request_id {request_id!r} was already used for a different request; "
                    "use a new request_id for a new request"
                )
            if served:
                raise DuplicateRequest(
                    f"request_id {request_id!r} was already served; its usage is billed. "
                    "Use a new request_id to ask again"
                )
