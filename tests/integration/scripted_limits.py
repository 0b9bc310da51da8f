"""A test-only admission policy that scripts what limits do, keyed by the end user id.

The limits engine decides from counters in Postgres; what a caller *sees* — allowances
on the first event, a RESOURCE_EXHAUSTED with ErrorInfo, QuotaFailure and RetryInfo, a
PERMISSION_DENIED block — depends only on what a policy returns or raises. This policy
returns and raises exactly that, so both clients (and grpcurl) are tested end to end on
a real server, through the real admission chain, status mapping and ledger. Install it
with ``start_app(extra_policies=(ScriptedLimits(),))``.

The Node client's tests (clients/node/test/limits.test.mjs) use the same user ids and
expect the same values: change them together.
"""

from __future__ import annotations

from datetime import UTC, datetime

from chatgate_server.admission import NO_TICKET, Ticket
from chatgate_server.domain import Allowance, CompletionRequest, LimitKind
from chatgate_server.errors import Blocked, QuotaExceeded, QuotaViolation

ADMITTED_USER = "limits-admitted"
"""Admitted, with ALLOWANCES on the first event."""
PER_MINUTE_USER = "limits-per-minute"
"""Refused: tokens per minute, two subjects over, retry after 12 s."""
MONTHLY_USER = "limits-monthly"
"""Refused: the monthly budget is spent, so no RetryInfo."""
BLOCKED_USER = "limits-blocked"
"""Refused: blocked by an operator."""
ONCE_USER = "limits-once"
"""Refused once (requests per minute, retry after 0.2 s), then admitted."""

ALLOWANCES = (
    Allowance(
        "tenant:scripted",
        LimitKind.TOKENS_PER_MINUTE,
        30_000,
        29_400,
        datetime(2030, 1, 1, 0, 0, 30, 250_000, tzinfo=UTC),
    ),
    Allowance(
        f"user:scripted/{ADMITTED_USER}/model:gpt-4o-mini",
        LimitKind.REQUESTS_PER_MINUTE,
        60,
        59,
        datetime(2030, 1, 1, 0, 0, 1, tzinfo=UTC),
    ),
    # Beyond 2^32 micro-dollars ($5000): int64 must survive both clients.
    Allowance(
        "tenant:scripted",
        LimitKind.SPEND_PER_MONTH,
        5_000_000_000,
        4_999_000_000,
        datetime(2030, 2, 1, tzinfo=UTC),
    ),
    Allowance("caller:scripted/billing", LimitKind.CONCURRENT_STREAMS, 4, 3, None),
)

PER_MINUTE_VIOLATIONS = (
    QuotaViolation(f"user:scripted/{PER_MINUTE_USER}", "tokens_per_minute 10000 reached"),
    QuotaViolation("tenant:scripted", "tokens_per_minute 30000 reached"),
)
MONTHLY_VIOLATIONS = (QuotaViolation("tenant:scripted", "spend_per_month 5000000000 reached"),)


class _Allowing(Ticket):
    __slots__ = ()

    @property
    def allowances(self) -> tuple[Allowance, ...]:
        return ALLOWANCES


class ScriptedLimits:
    """Admits, refuses or blocks by ``request.user_id``; any other user passes untouched."""

    def __init__(self) -> None:
        self._refused_once = False

    async def admit(self, request: CompletionRequest) -> Ticket:
        if request.user_id == ONCE_USER and not self._refused_once:
            self._refused_once = True
            raise QuotaExceeded(
                "over the requests per minute of user scripted/limits-once",
                reason="REQUESTS_PER_MINUTE_EXCEEDED",
                violations=(QuotaViolation(f"user:scripted/{ONCE_USER}", "requests_per_minute 1 reached"),),
                retry_after=0.2,
            )
        if request.user_id == ADMITTED_USER:
            return _Allowing()
        if request.user_id == PER_MINUTE_USER:
            raise QuotaExceeded(
                "over the tokens per minute of user scripted/limits-per-minute and tenant scripted",
                reason="TOKENS_PER_MINUTE_EXCEEDED",
                violations=PER_MINUTE_VIOLATIONS,
                retry_after=12,
            )
        if request.user_id == MONTHLY_USER:
            raise QuotaExceeded(
                "tenant scripted has spent its monthly budget",
                reason="SPEND_PER_MONTH_EXCEEDED",
                violations=MONTHLY_VIOLATIONS,
            )
        if request.user_id == BLOCKED_USER:
            raise Blocked("user scripted/limits-blocked is blocked until 2030-01-01: abuse review")
        return NO_TICKET
