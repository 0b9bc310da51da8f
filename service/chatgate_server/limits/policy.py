"""The limits admission policy: reserve what a call may cost on every limit that
applies, all or nothing; settle with what it did cost.

What a call reserves, by kind:

- requests per minute: 1; concurrent streams: 1 (given back when the call ends);
- tokens: the input counted by the estimator (usage/tokens.py, bounded work) plus the
  request's max_completion_tokens — or, when it set none, the configured cap, which the
  ticket then sends upstream as the call's max_completion_tokens, so the reservation
  bounds what the call can use;
- spend: those tokens priced at the model's input and output rates. A model with no
  price cannot be held to a spend limit: such a call is refused (never unlimited).

Settlement replaces each reservation with the call's real usage and cost from its
usage record (completed, cancelled, cut, failed: tokens reported or estimated), so a
call that ended early frees what it did not use.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from chatgate_server.admission import NO_TICKET, Ticket
from chatgate_server.domain import (
    Allowance,
    CompletionRequest,
    CostBasis,
    LimitKind,
    SamplingOptions,
    TokenUsage,
    UsageRecord,
)
from chatgate_server.errors import QuotaExceeded, QuotaViolation
from chatgate_server.limits.buckets import BucketAccount
from chatgate_server.limits.definitions import REASONS, SPEND_KINDS, TOKEN_KINDS, UNITS, Limit
from chatgate_server.limits.engine import Entry, Leaser
from chatgate_server.limits.table import LimitTable
from chatgate_server.usage.pricing import PriceTable
from chatgate_server.usage.tokens import TokenEstimator

DEFAULT_MAX_COMPLETION_TOKENS = 4096
_UNPRICED = -1
# Plans kept at most (one per limit set in use: per tenant, caller, user and model).
_PLANS_MAX = 100_000
_T = TypeVar("_T")


class LimitTicket(Ticket):
    """The reservations one call holds on its limits."""

    __slots__ = ("_cap", "_clock", "_held", "_leaser", "_settled", "_wall")

    def __init__(
        self,
        held: Sequence[tuple[Entry, int]],
        cap: int | None,
        leaser: Leaser,
        wall: datetime,
        clock: Callable[[], float],
    ) -> None:
        self._held = held
        self._cap = cap
        self._leaser = leaser
        self._wall = wall
        self._clock = clock
        self._settled = False

    def amend(self, request: CompletionRequest) -> CompletionRequest:
        if self._cap is None:
            return request
        sampling = _evolve(request.sampling, "max_completion_tokens", self._cap)
        return _evolve(request, "sampling", sampling)

    @property
    def allowances(self) -> tuple[Allowance, ...]:
        """For each kind of limit on the call, the one with the least remaining (the
        first of them on a tie: tenant, caller, user; all models, then the model's) —
        the limit that binds the next call, as OpenAI's headers give one per kind.
        Limits of the same kind with more headroom are left out: a caller held to
        eight limits gets four allowances, and the first event costs half as much."""
        now, wall = self._clock(), self._wall
        held = self._held
        if len(held) == 1:
            entry = held[0][0]
            return (_allowance(entry, _remaining(entry, now), now, wall),)
        tightest: dict[LimitKind, tuple[int, Entry]] = {}
        for entry, _ in held:
            remaining, kind = _remaining(entry, now), entry.limit.kind
            found = tightest.get(kind)
            if found is None or remaining < found[0]:
                tightest[kind] = (remaining, entry)
        return tuple([_allowance(entry, remaining, now, wall) for remaining, entry in tightest.values()])

    def settle(self, record: UsageRecord) -> UsageRecord:
        if not self._settled:
            self._settled = True
            for entry, reserved in self._held:
                entry.account.settle(reserved, _actual(entry.limit.kind, reserved, record))
        return record

    def release(self) -> None:
        if not self._settled:
            self._settled = True
            for entry, reserved in self._held:
                entry.account.cancel(reserved)


class _Plan:
    """What admitting a call under one set of limits takes, worked out once per set
    rather than per call: whether its input must be counted (a token or spend limit
    applies), whether it must be priced (a spend limit applies), and which amount each
    limit reserves (an index into ``(1, tokens, spend)``)."""

    __slots__ = ("counts", "limits", "needs", "priced")

    def __init__(self, limits: tuple[Limit, ...]) -> None:
        self.limits = limits
        kinds = {limit.kind for limit in limits}
        self.counts = bool(kinds & (TOKEN_KINDS | SPEND_KINDS))
        self.priced = bool(kinds & SPEND_KINDS)
        self.needs = tuple(_need(limit.kind) for limit in limits)


class LimitPolicy:
    """Admits a call when every limit that applies to it can cover its reservation."""

    def __init__(
        self,
        table: LimitTable,
        leaser: Leaser,
        estimator: TokenEstimator,
        prices: PriceTable,
        *,
        max_completion_tokens: int = DEFAULT_MAX_COMPLETION_TOKENS,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._table = table
        self._leaser = leaser
        self._estimator = estimator
        # The estimator's input count alone when it has one (no usage object built).
        count = getattr(estimator, "input_tokens", None)
        self._input_tokens: Callable[[CompletionRequest], int] = (
            count if callable(count) else lambda request: estimator.estimate(request, ()).input_tokens
        )
        self._prices = prices
        self._max_completion_tokens = max_completion_tokens
        self._clock = clock
        self._wall = wall
        # Plans by the identity of the limit set they were made for. The table hands out
        # one tuple per (tenant, caller, user, model) per load; each plan keeps its tuple,
        # so an id cannot be reused while its plan is here. Emptied when the table reloads.
        self._plans: dict[int, _Plan] = {}
        self._plans_of: object = None

    async def admit(self, request: CompletionRequest) -> Ticket:
        caller = request.caller
        limits = self._table.applicable(caller.tenant, caller.service, request.user_id, request.model)
        if not limits:
            return NO_TICKET
        plan = self._plan(limits)
        cap, tokens, spend = None, 0, 0
        if plan.counts:
            out = request.sampling.max_completion_tokens
            if out is None:
                cap = out = self._max_completion_tokens
            tokens, spend = self._reservation(request, out, plan.priced)
        wall = self._wall()
        now = self._clock()
        held, refused = self._take(plan, (1, tokens, spend), now, wall)
        if refused:
            held = await self._wait(held, refused, now, wall)
        return LimitTicket(held, cap, self._leaser, wall, self._clock)

    def _plan(self, limits: tuple[Limit, ...]) -> _Plan:
        # Only ``applicable`` is required of the table; its ``index`` (when it has one)
        # says when it reloaded.
        index = getattr(self._table, "index", None)
        if index is not self._plans_of:  # reloaded: the old sets are gone
            self._plans.clear()
            self._plans_of = index
        plan = self._plans.get(id(limits))
        if plan is None or plan.limits is not limits:
            if len(self._plans) >= _PLANS_MAX:
                self._plans.clear()
            plan = self._plans[id(limits)] = _Plan(limits)
        return plan

    def _reservation(self, request: CompletionRequest, out: int, priced: bool) -> tuple[int, int]:
        """Tokens the call may use, and what they may cost (_UNPRICED: no price)."""
        estimated = self._input_tokens(request)
        if not priced:
            return estimated + out, 0
        price = self._prices.lookup(request.model)
        if price is None:
            return estimated + out, _UNPRICED
        usage = TokenUsage(input_tokens=estimated, output_tokens=out)
        cost = self._prices.cost(request.model, usage).usd_micros
        return estimated + out, cost if cost is not None else _UNPRICED

    def _take(
        self, plan: _Plan, amounts: tuple[int, int, int], now: float, wall: datetime
    ) -> tuple[list[tuple[Entry, int]], list[tuple[Entry, int]] | None]:
        """Reserve on every limit that can cover the call now, without waiting: what was
        taken, and what could not be (None when everything was: the common case)."""
        leaser = self._leaser
        held: list[tuple[Entry, int]] = []
        refused: list[tuple[Entry, int]] | None = None
        for limit, which in zip(plan.limits, plan.needs, strict=True):
            n = amounts[which]
            entry = leaser.entry(limit, wall)
            if n != _UNPRICED and n <= limit.amount and leaser.take(entry, n, now):
                held.append((entry, n))
            elif refused is None:
                refused = [(entry, n)]
            else:
                refused.append((entry, n))
        return held, refused

    async def _wait(
        self, held: list[tuple[Entry, int]], refused: list[tuple[Entry, int]], now: float, wall: datetime
    ) -> list[tuple[Entry, int]]:
        """Wait for syncs where that may help; all or nothing: a refusal gives back what
        was taken."""
        waitable = [(e, n) for e, n in refused if n != _UNPRICED and n <= e.limit.amount]
        # One deadline for all: the call waits at most wait_s in all, and rarely at all.
        deadline = now + self._leaser.tuning.wait_s
        try:
            for entry, n in waitable:
                if await self._leaser.acquire(entry, n, deadline):
                    held.append((entry, n))
                    refused.remove((entry, n))
        except BaseException:  # the caller left while waiting: nothing may stay reserved
            for entry, n in held:
                entry.account.cancel(n)
            raise
        if refused:
            for entry, n in held:
                entry.account.cancel(n)
            raise _refusal(refused, self._clock(), wall)
        return held


def _evolve(obj: _T, name: str, value: object) -> _T:
    """A copy of the frozen dataclass ``obj`` with the field ``name`` set to ``value``:
    what dataclasses.replace gives, at ~40 % of its cost (it introspects the fields and
    calls __init__ with keywords; this sets the slots directly, which is safe because
    the request's classes validate nothing in __init__ — checked below)."""
    out = object.__new__(type(obj))
    for field in _FIELDS[type(obj)]:
        object.__setattr__(out, field, getattr(obj, field))
    object.__setattr__(out, name, value)
    return out


_FIELDS: dict[type, tuple[str, ...]] = {}
for _cls in (CompletionRequest, SamplingOptions):
    assert not hasattr(_cls, "__post_init__"), f"{_cls.__name__} validates: _evolve would skip it"
    _FIELDS[_cls] = tuple(f.name for f in dataclasses.fields(_cls))


def _need(kind: LimitKind) -> int:
    """Which of a call's amounts a limit of ``kind`` reserves: 0 one (a request, a
    stream), 1 its tokens, 2 its spend."""
    if kind in TOKEN_KINDS:
        return 1
    if kind in SPEND_KINDS:
        return 2
    return 0


def _actual(kind: LimitKind, reserved: int, record: UsageRecord) -> int:
    """What the call used of a limit of ``kind`` (that reserved ``reserved``)."""
    if kind in TOKEN_KINDS:
        return max(record.usage.total_tokens, 0)
    if kind in SPEND_KINDS:
        cost = record.cost
        if cost.basis is CostBasis.NOT_CHARGED:
            return 0
        # Unknown price (the upstream resolved an unpriced model): the reservation stands.
        return cost.usd_micros if cost.usd_micros is not None else reserved
    if kind is LimitKind.REQUESTS_PER_MINUTE:
        return reserved
    return 0  # concurrent streams: the slot comes back


def _refusal(refused: list[tuple[Entry, int]], now: float, wall: datetime) -> QuotaExceeded:
    violations = []
    waits: list[float | None] = []
    for entry, n in refused:
        limit = entry.limit
        units = UNITS[limit.kind]
        if n == _UNPRICED:
            what = f"limit of {limit.amount} {units}: the model has no price, so no spend can be admitted"
            waits.append(None)
        elif n > limit.amount:
            what = f"limit of {limit.amount} {units}: this call alone needs {n}"
            waits.append(None)
        else:
            what = f"limit of {limit.amount} {units} reached (this call needs {n})"
            waits.append(_retry_after(entry, n, now, wall))
        violations.append(QuotaViolation(limit.target.label, what))
    first = refused[0][0].limit
    retry = None if any(w is None for w in waits) else max(w for w in waits if w is not None)
    return QuotaExceeded(
        f"{first.target.label}: {UNITS[first.kind]} limit reached",
        reason=REASONS[first.kind],
        violations=tuple(violations),
        retry_after=retry,
    )


def _retry_after(entry: Entry, n: int, now: float, wall: datetime) -> float | None:
    """When the call would fit: a bucket's refill, the next UTC day; a month's budget
    is not worth waiting for (None); a stream slot frees when some call ends (1 s)."""
    account = entry.account
    if isinstance(account, BucketAccount):
        return account.retry_after(n, now)
    kind = entry.limit.kind
    if kind is LimitKind.CONCURRENT_STREAMS:
        return 1.0
    if kind is LimitKind.SPEND_PER_MONTH or entry.ends_at is None:
        return None
    return max((entry.ends_at - wall).total_seconds(), 1.0)


def _remaining(entry: Entry, now: float) -> int:
    """What the limit still allows after this call's reservation, within 0..amount."""
    account, amount = entry.account, entry.limit.amount
    if isinstance(account, BucketAccount):
        level = account.level_now(now)
        remaining = int(level + account.held) if account.held > 0 else int(level)
    else:
        remaining = account.estimate_remaining(now)
    return 0 if remaining < 0 else amount if remaining > amount else remaining


def _allowance(entry: Entry, remaining: int, now: float, wall: datetime) -> Allowance:
    account, limit = entry.account, entry.limit
    resets_at = entry.ends_at
    if isinstance(account, BucketAccount):
        # Whole again once refilled to capacity (now, if it is full).
        missing = account.capacity - account.level_now(now)
        resets_at = wall + timedelta(seconds=missing / account.per_s) if missing > 0 else wall
    return Allowance(limit.target.label, limit.kind, limit.amount, remaining, resets_at)
