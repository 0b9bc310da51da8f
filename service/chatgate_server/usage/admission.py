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
and recently finished: covers rows still in the ledger's queue or spool), which can
refuse without any I/O; then the id is **reserved in Postgres** before the call runs
(:mod:`~chatgate_server.usage.reservations`), so that other worker processes and
replicas see it at once — with ``--workers N`` each process's memory alone let two
calls with one id through, and their rows arrive only after the calls. The same round
trip returns the id's usage rows within the idempotency window. An attempt that sent
the caller nothing *releases* its reservation when it ends (in the background, off the
call's path), after which only the same content may take the id over; an attempt that
served keeps it for the window. A claim that finds the same content holding the id
looks once more after 50 ms before refusing: a retry sent the moment its attempt
failed on another process can outrun that release.

Generated ids (no ``request_id`` in the call) are unique by construction and skip all
of this: no Postgres round trip on that path. When a reservation fails or does not
answer within ``reserve_timeout_s`` (three seconds by
default: a reservation normally takes one round trip, and a connection refused fails at
once, so the cap only bites when Postgres is slow or hangs; a cap of one second failed
open under a burst of 400 calls on a loaded two-core host — both calls of a pair
served — while three held), the id is guarded **by this process
only** (fail open: serving beats refusing a probably-fine retry), and so is every call
for ``backoff_s`` (2 s) after, until one tries Postgres again. The guard does not take
the ledger's word that Postgres is away: the ledger declares it after 0.2 s without an
answer to a batch (to bound what a kill -9 can lose), which a loaded host reaches while
reservations still answer in time. The write-time
settlement still keeps one row unless two served attempts raced, in which case both
rows stay and a warning is logged. A release that cannot be written (Postgres away)
is retried a few times; failing that, the caller's retry is refused until the window
ends, except by the process that ran the attempt, which remembers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import orjson

from chatgate_server.admission import NO_TICKET, Ticket
from chatgate_server.domain import CompletionRequest, UsageRecord
from chatgate_server.errors import DuplicateRequest
from chatgate_server.usage.reservations import Claim

log = logging.getLogger(__name__)


class Reservations(Protocol):
    """Where ids are reserved for all processes (``reservations.ReservationStore``)."""

    async def claim(self, request_id: str, fingerprint: str) -> Claim: ...

    async def release(self, request_id: str, fingerprint: str) -> None: ...

    async def forget(self, request_id: str, fingerprint: str) -> None: ...


# What identifies a request's content: everything but the id itself.
_NOT_CONTENT = frozenset({"request_id", "request_id_from_caller"})
# Fields added after fingerprints were first stored (issue 16's request options), hashed
# only when set: an id reserved before an upgrade, retried after it, still matches.
_LATER_FIELDS = frozenset(
    {"reasoning_effort", "verbosity", "logprobs", "top_logprobs", "service_tier", "prompt_cache_key"}
)


def _set_only(content: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in content.items() if k not in _LATER_FIELDS or (v is not None and v is not False)}


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")


def fingerprint(request: CompletionRequest) -> str:
    """A 128-bit hash of the request's content (caller, model, messages, options, tags).

    Canonical: the same request built twice hashes the same; any field that changes
    what the upstream is asked or whom it is billed to changes the hash.
    """
    content = _set_only(
        {f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name not in _NOT_CONTENT}
    )
    sampling = request.sampling
    # orjson writes a dataclass's fields in their declared order (OPT_SORT_KEYS does not
    # reorder them), as the fingerprints stored so far have them: keep that order.
    content["sampling"] = orjson.Fragment(
        orjson.dumps(_set_only({f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling)}))
    )
    # Whom it is billed to, not how the caller proved itself: a retry with a rotated
    # token (another credential id) is the same request. The same two keys as before
    # callers authenticated, so earlier fingerprints still match.
    content["caller"] = {"tenant": request.caller.tenant, "service": request.caller.service}
    data = orjson.dumps(content, default=_plain, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).digest()[:16].hex()


@dataclass(slots=True)
class _Finished:
    fingerprint: str
    served: bool
    at: float


class _HeldId(Ticket):
    """A caller-supplied request id this call holds until it ends."""

    __slots__ = ("_guard", "_request_id")

    def __init__(self, guard: RequestIdGuard, request_id: str) -> None:
        self._guard = guard
        self._request_id = request_id

    def settle(self, record: UsageRecord) -> UsageRecord:
        return self._guard.finished(record)

    def release(self) -> None:
        self._guard.abandon(self._request_id)


class RequestIdGuard:
    """Admission check and bookkeeping for caller-supplied request ids: a precondition
    of the admission chain (a call it refuses leaves no row: the id's row is another
    call's)."""

    def __init__(
        self,
        reservations: Reservations,
        *,
        window: timedelta,
        reserve_timeout_s: float = 3.0,
        remember: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        release_delays_s: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
        recheck_delay_s: float = 0.05,
        backoff_s: float = 2.0,
    ) -> None:
        """``remember``: how many finished ids to keep in memory. ``release_delays_s``:
        the pauses between attempts to release a reservation. ``recheck_delay_s``: how
        long a claim refused for a same-content holder waits before it looks again.
        ``backoff_s``: after a claim failed, how long later calls skip the database
        (then one call tries again), so an outage costs one timeout, not one per call."""
        self._reservations = reservations
        self._window = window
        self._timeout_s = reserve_timeout_s
        self._remember = remember
        self._clock = clock
        self._release_delays_s = tuple(release_delays_s)
        self._recheck_delay_s = recheck_delay_s
        self._in_flight: dict[str, str] = {}
        self._held: set[str] = set()  # in flight with a reservation in Postgres
        self._finished: OrderedDict[str, _Finished] = OrderedDict()
        # Releases under way, or failed (the task's result is False), by id.
        self._releases: OrderedDict[str, asyncio.Task[bool]] = OrderedDict()
        self.lookups_skipped = 0
        self._backoff_s = backoff_s
        self._skip_until = float("-inf")

    async def admit(self, request: CompletionRequest) -> Ticket:
        """Raise DuplicateRequest if ``request`` may not run under its id; else mark it in
        flight and return the ticket that settles it when the call ends."""
        if not request.request_id_from_caller:
            return NO_TICKET
        request_id = request.request_id
        fp = fingerprint(request)
        if request_id in self._in_flight:
            raise DuplicateRequest(f"request_id {request_id!r} is in use by a call still in progress")
        seen = self._recent(request_id)
        if seen is not None:  # refused from memory without any I/O
            self._check(request_id, fp, [(seen.fingerprint, seen.served)])
        # Placeholder first: a concurrent call with this id must not pass while we wait.
        self._in_flight[request_id] = fp
        try:
            await self._reserve(request_id, fp)
        except BaseException:
            del self._in_flight[request_id]
            raise
        return _HeldId(self, request_id)

    def finished(self, record: UsageRecord) -> UsageRecord:
        """The call with ``record.request_id`` ended: remember how, release its reservation
        if it sent nothing, and put the request's fingerprint on its record (None for
        generated ids)."""
        request_id = record.request_id
        fp = self._in_flight.pop(request_id, None)
        if fp is None:
            return record
        served = record.resolved_model is not None
        self._finished[request_id] = _Finished(fp, served, self._clock())
        self._finished.move_to_end(request_id)
        while len(self._finished) > self._remember:
            self._finished.popitem(last=False)
        if request_id in self._held:
            self._held.discard(request_id)
            if not served:
                self._start_release(request_id, fp)
        return dataclasses.replace(record, request_fingerprint=fp)

    def abandon(self, request_id: str) -> None:
        """The call with ``request_id`` ended without a record: it sent nothing, so its
        reservation is released and nothing is remembered of it."""
        fp = self._in_flight.pop(request_id, None)
        if fp is not None and request_id in self._held:
            self._held.discard(request_id)
            self._start_release(request_id, fp)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let releases under way finish (bounded), then cancel what is left."""
        pending = [t for t in self._releases.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        for task in pending:
            task.cancel()
        self._releases.clear()

    async def _reserve(self, request_id: str, fp: str) -> None:
        await self._settle_release(request_id, fp)
        claim = await self._claim(request_id, fp)
        if claim is None:
            return  # fail open, see the module docstring
        if not claim.won and claim.holder in (None, fp):
            # Same content (or a holder committed meanwhile): the caller's retry may have
            # outrun the release of its failed attempt on another process, which is a
            # round trip behind. Look once more before refusing (a failed second look
            # changes nothing: the id is known to be held).
            await asyncio.sleep(self._recheck_delay_s)
            claim = await self._claim(request_id, fp) or claim
        if not claim.won:
            if claim.holder is not None and claim.holder != fp:
                self._check(request_id, fp, [(claim.holder, False)])
            raise DuplicateRequest(
                f"request_id {request_id!r} is taken by a call still in progress or already served "
                "(and billed); use a new request_id for a new request"
            )
        self._held.add(request_id)
        try:
            self._check(request_id, fp, [(a.fingerprint, a.served) for a in claim.stored])
        except DuplicateRequest:
            self._held.discard(request_id)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout_s):
                    await self._reservations.forget(request_id, fp)
            raise

    async def _claim(self, request_id: str, fp: str) -> Claim | None:
        """One claim, bounded; None when Postgres did not answer in time (logged), and
        for ``backoff_s`` after that, without trying."""
        if self._clock() < self._skip_until:
            self.lookups_skipped += 1
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._reservations.claim(request_id, fp)
        except Exception as exc:  # noqa: BLE001 - fail open, see the module docstring
            self.lookups_skipped += 1
            self._skip_until = self._clock() + self._backoff_s
            log.warning(
                "request id reservation skipped (%s): %r guarded by this process only",
                type(exc).__name__,
                request_id,
            )
            return None

    async def _settle_release(self, request_id: str, fp: str) -> None:
        """This process's own earlier attempt of the id must be released before the retry
        claims it: wait for a release under way, or try a failed one once more."""
        task = self._releases.pop(request_id, None)
        if task is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._timeout_s):
                if not await asyncio.shield(task):
                    await self._reservations.release(request_id, fp)

    def _start_release(self, request_id: str, fp: str) -> None:
        task = asyncio.get_running_loop().create_task(self._release(request_id, fp))
        self._releases[request_id] = task
        self._releases.move_to_end(request_id)
        while len(self._releases) > self._remember:
            _, oldest = self._releases.popitem(last=False)
            oldest.cancel()

    async def _release(self, request_id: str, fp: str) -> bool:
        for delay in (*self._release_delays_s, None):
            try:
                async with asyncio.timeout(self._timeout_s * 4):
                    await self._reservations.release(request_id, fp)
                if self._releases.get(request_id) is asyncio.current_task():
                    del self._releases[request_id]
                return True
            except Exception as exc:  # noqa: BLE001 - retried, then logged
                if delay is None:
                    log.warning(
                        "could not release request id %r (%s): a retry on another process is "
                        "refused until the window ends",
                        request_id,
                        type(exc).__name__,
                    )
                    return False
                await asyncio.sleep(delay)
        return False

    def _recent(self, request_id: str) -> _Finished | None:
        seen = self._finished.get(request_id)
        if seen is not None and self._clock() - seen.at > self._window.total_seconds():
            del self._finished[request_id]
            return None
        return seen

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
