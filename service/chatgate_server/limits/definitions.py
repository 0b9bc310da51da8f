"""What a limit is: a subject, an optional model, a kind and an amount.

A limit applies to one subject — a tenant, a caller (one service of a tenant), an end
user within a tenant, or every user of a tenant (``user acme/*``, the tenant's default
for each user) — and to every model (``model == ''``) or to one requested model.
Several sources may limit the same thing (the operator, and the abuse detector for a
while); the effective amount is the smallest unexpired one (migration 0009).

A call is limited by every definition that matches it: tenant, caller and user (the
user's own limit, else the tenant's default for users), each for all models and for the
requested model. Each matching definition is one independent limit with its own counter
— a user default therefore gives *each* user that amount, not all users together.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from chatgate_server.domain import LimitKind


class Scope(enum.StrEnum):
    TENANT = "tenant"
    CALLER = "caller"
    USER = "user"


# The longest names the limits table holds (migration 0009): checked before the row is
# sent, so a name too long is a usage error rather than Postgres's multi-line refusal.
MAX_TENANT = 128
MAX_NAME = 256

EACH_USER = "*"
"""``subject`` of a user-scope limit that applies to each user of the tenant."""

RATE_KINDS = frozenset({LimitKind.REQUESTS_PER_MINUTE, LimitKind.TOKENS_PER_MINUTE})
TOKEN_KINDS = frozenset({LimitKind.TOKENS_PER_MINUTE, LimitKind.TOKENS_PER_DAY})
SPEND_KINDS = frozenset({LimitKind.SPEND_PER_DAY, LimitKind.SPEND_PER_MONTH})

# The error reason a refusal by each kind carries (errors.QuotaExceeded).
REASONS: dict[LimitKind, str] = {
    LimitKind.REQUESTS_PER_MINUTE: "REQUESTS_PER_MINUTE_EXCEEDED",
    LimitKind.TOKENS_PER_MINUTE: "TOKENS_PER_MINUTE_EXCEEDED",
    LimitKind.TOKENS_PER_DAY: "TOKENS_PER_DAY_EXCEEDED",
    LimitKind.SPEND_PER_DAY: "SPEND_PER_DAY_EXCEEDED",
    LimitKind.SPEND_PER_MONTH: "SPEND_PER_MONTH_EXCEEDED",
    LimitKind.CONCURRENT_STREAMS: "CONCURRENT_STREAMS_EXCEEDED",
}

UNITS: dict[LimitKind, str] = {
    LimitKind.REQUESTS_PER_MINUTE: "requests per minute",
    LimitKind.TOKENS_PER_MINUTE: "tokens per minute",
    LimitKind.TOKENS_PER_DAY: "tokens per day (UTC)",
    LimitKind.SPEND_PER_DAY: "micro-dollars per day (UTC)",
    LimitKind.SPEND_PER_MONTH: "micro-dollars per calendar month (UTC)",
    LimitKind.CONCURRENT_STREAMS: "concurrent streams",
}


@dataclass(frozen=True, slots=True)
class Target:
    """Whom a definition limits: ``tenant acme``, ``caller acme/billing``,
    ``user acme/u-42``, ``user acme/*``; optionally only for one model."""

    scope: Scope
    tenant: str
    subject: str = ""  # '' for a tenant; the caller's name; the user id or '*'
    model: str = ""
    label: str = field(init=False, compare=False, repr=False)
    """The subject as callers see it in QuotaFailure and allowances."""

    def __post_init__(self) -> None:
        name = (
            f"tenant:{self.tenant}"
            if self.scope is Scope.TENANT
            else f"{self.scope}:{self.tenant}/{self.subject}"
        )
        object.__setattr__(self, "label", f"{name}/model:{self.model}" if self.model else name)

    @classmethod
    def parse(cls, scope: str, who: str, model: str = "") -> Target:
        """From the command line: ``tenant acme``, ``caller acme/billing``, ``user acme/u-42``."""
        kind = Scope(scope)
        if len(model) > MAX_NAME:
            raise ValueError(f"a model name is at most {MAX_NAME} characters")
        if kind is Scope.TENANT:
            if not who or "/" in who:
                raise ValueError(f"a tenant is named alone, not {who[:MAX_TENANT]!r}")
            if len(who) > MAX_TENANT:
                raise ValueError(f"a tenant is at most {MAX_TENANT} characters")
            return cls(kind, who, "", model)
        tenant, slash, subject = who.partition("/")
        if not slash or not tenant or not subject:
            raise ValueError(f"a {scope} is named TENANT/NAME, not {who[:MAX_TENANT]!r}")
        if len(tenant) > MAX_TENANT or len(subject) > MAX_NAME:
            raise ValueError(f"a tenant is at most {MAX_TENANT} characters, a {scope}'s name {MAX_NAME}")
        if kind is Scope.CALLER and subject == EACH_USER:
            raise ValueError("'*' (each user) is only for user limits")
        return cls(kind, tenant, subject, model)


@dataclass(frozen=True, slots=True)
class Definition:
    """One row of the ``limits`` table."""

    target: Target
    kind: LimitKind
    amount: int
    source: str = "operator"
    expires_at: datetime | None = None
    reason: str = ""
    set_by: str = ""
    set_at: datetime | None = None

    def live(self, now: datetime) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True, slots=True)
class Limit:
    """One effective limit that applies to a call: whose counter, which kind, how much."""

    target: Target
    kind: LimitKind
    amount: int
    key: str = field(init=False, compare=False, repr=False)
    """The counter's name (without its window): the same in every process."""

    def __post_init__(self) -> None:
        t = self.target
        # Made once per limit table load, not once per call.
        object.__setattr__(self, "key", f"{t.scope}|{t.tenant}|{t.subject}|{t.model}|{self.kind}")


def effective(definitions: Iterable[Definition], now: datetime) -> dict[tuple[Target, LimitKind], int]:
    """The smallest unexpired amount per (target, kind)."""
    out: dict[tuple[Target, LimitKind], int] = {}
    for d in definitions:
        if not d.live(now):
            continue
        key = (d.target, d.kind)
        out[key] = min(out.get(key, d.amount), d.amount)
    return out


def next_expiry(definitions: Iterable[Definition], now: datetime) -> datetime | None:
    """When the effective limits next change by themselves (a tightening ends)."""
    times = [d.expires_at for d in definitions if d.expires_at is not None and d.expires_at > now]
    return min(times, default=None)


# --- windows ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """A budget's current UTC window: its name (part of the counter's) and its end."""

    name: str
    ends_at: datetime | None


FOREVER = Window("-", None)


def window(kind: LimitKind, now: datetime) -> Window:
    """The window ``now`` falls in for a budget kind; FOREVER for concurrency (and rates,
    which have no window: a bucket refills continuously)."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if kind in (LimitKind.TOKENS_PER_DAY, LimitKind.SPEND_PER_DAY):
        return Window(day.date().isoformat(), day + timedelta(days=1))
    if kind is LimitKind.SPEND_PER_MONTH:
        first = day.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
        return Window(first.strftime("%Y-%m"), following)
    return FOREVER
