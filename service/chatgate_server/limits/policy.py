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

from chatgate_server.admission import NO_TICKET, Ticket
from chatgate_server.domain import Allowance, CompletionRequest, CostBasis, LimitKind, TokenUsage, UsageRecord
from chatgate_server.errors import QuotaExceeded, QuotaViolation
from chatgate_server.limits.buckets import BucketAccount
from chatgate_server.limits.definitions import REASONS, SPEND_KINDS, TOKEN_KINDS, UNITS, Limit
from chatgate_server.limits.engine import Entry, Leaser
from chatgate_server.limits.table import LimitTable
from chatgate_server.usage.pricing import PriceTable
from chatgate_server.usage.tokens import TokenEstimator

DEFAULT_MAX_COMPLETION_TOKENS = 4096
_UNPRICED = -1


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
        sampling = dataclasses.replace(request.sampling, max_completion_tokens=self._cap)
        return dataclasses.replace(request, sampling=sampling)

    @property
    def allowances(self) -> tuple[Allowance, ...]:
        now = self._clock()
        return tuple(_allowance(entry, now, self._wall) for entry, _ in self._held)

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
        self._prices = prices
        self._max_completion_tokens = max_completion_tokens
        self._clock = clock
        self._wall = wall

    async def admit(self, request: CompletionRequest) -> Ticket:
        caller = request.caller
        limits = self._table.applicable(caller.tenant, caller.service, request.user_id, request.model)
        if not limits:
            return NO_TICKET
        kinds = {limit.kind for limit in limits}
        cap, tokens, spend = None, 0, 0
        if kinds & (TOKEN_KINDS | SPEND_KINDS):
            out = request.sampling.max_completion_tokens
            if out is None:
                cap = out = self._max_completion_tokens
            tokens, spend = self._reservation(request, out, bool(kinds & SPEND_KINDS))
        wall = self._wall()
        needs = [(limit, _need(limit.kind, tokens, spend)) for limit in limits]
        held = await self._reserve(needs, wall)
        return LimitTicket(held, cap, self._leaser, wall, self._clock)

    def _reservation(self, request: CompletionRequest, out: int, priced: bool) -> tuple[int, int]:
        """Tokens the call may use, and what they may cost (_UNPRICED: no price)."""
        estimated = self._estimator.estimate(request, ()).input_tokens
        if not priced:
            return estimated + out, 0
        price = self._prices.lookup(request.model)
        if price is None:
            return estimated + out, _UNPRICED
        usage = TokenUsage(input_tokens=estimated, output_tokens=out)
        cost = self._prices.cost(request.model, usage).usd_micros
        return estimated + out, cost if cost is not None else _UNPRICED

    async def _reserve(self, needs: list[tuple[Limit, int]], wall: datetime) -> list[tuple[Entry, int]]:
        """Reserve on every limit, or on none (a refusal gives back what was taken)."""
        held: list[tuple[Entry, int]] = []
        refused: list[tuple[Entry, int]] = []
        now = self._clock()
        for limit, n in needs:
            entry = self._leaser.entry(limit, wall)
            if n != _UNPRICED and n <= limit.amount and self._leaser.take(entry, n, now):
                held.append((entry, n))
            else:
                refused.append((entry, n))
        if refused:
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


def _need(kind: LimitKind, tokens: int, spend: int) -> int:
    if kind in TOKEN_KINDS:
        return tokens
    if kind in SPEND_KINDS:
        return spend
    return 1


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


def _allowance(entry: Entry, now: float, wall: datetime) -> Allowance:
    account, limit = entry.account, entry.limit
    if isinstance(account, BucketAccount):
        level = account.level_now(now)
        remaining = int(level + account.held) if account.held > 0 else int(level)
        # Whole again once refilled to capacity.
        resets_at: datetime | None = wall + timedelta(seconds=(account.capacity - level) / account.per_s)
    else:
        remaining = account.estimate_remaining(now)
        resets_at = entry.ends_at
    amount = limit.amount
    return Allowance(limit.target.label, limit.kind, amount, max(min(remaining, amount), 0), resets_at)
