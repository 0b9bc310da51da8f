"""The abuse detector's rules: pure functions from usage aggregates to findings.

Three rules, each over what Postgres already holds (limits/anomaly_store.py reads it):

- **usage_spike** (per user of a tenant): the user's tokens or spend in the last hour
  exceed ``spike_factor`` × their mean hourly amount over the ``baseline_days`` whole UTC
  days before today (fewer for a user first seen within them: from their first day, so
  a short history is not diluted by days before they existed), *and* an absolute floor
  (``token_floor`` tokens, ``spend_floor`` dollars). The floor is what keeps a new
  user's first busy hour (no baseline at all) and a light user's ordinary bursts from
  being findings; the factor is what keeps a heavy user's ordinary day from being one.
  The mean is over all hours, idle ones included, so a user active 8 hours a day already
  runs at 3× their mean: the default factor (10) leaves room for that. A slow ramp
  (a fifth more every day) keeps even its busy hours at a few times its trailing mean
  and is not found; a rise that crosses 10× within a day is what a spike is.
  The same rule judges each **caller** of a tenant against its own baseline (its rows of
  the baseline days): a caller's credential used to spend through many users, each of
  them within their own usual, is still far above what the caller itself usually
  spends. A caller with no history in the baseline days is not judged by it (a new
  service's first busy hour is not abuse; its users are still judged one by one).
- **refusal_burst** (per caller of a tenant, or the user behind most of it): at least
  ``refusal_burst`` calls refused in the last five minutes — rows with outcome
  ``rejected`` (a limit, a policy) plus the calls refused at the edge without a row
  (invalid requests, a taken request id), which each process counts in memory and
  flushes per minute. Refusals for a block (PERMISSION_DENIED) are left out: a blocked
  user retrying must not get their whole caller blocked. For the same reason, when one
  user made at least half of a caller's refusals, the finding (and any action) is that
  user's, not the caller's.
- **user_fanout** (per caller of a tenant): at least ``new_users`` user ids in the last
  hour that the tenant had not seen before that hour (not in the baseline days' roll-up,
  not earlier that day): a caller suddenly fanning out to many new identities, the shape
  of credential stuffing or of one client minting user ids to dodge per-user limits.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from chatgate_server.domain import LimitKind
from chatgate_server.limits.anomaly_settings import DetectorSettings
from chatgate_server.limits.blocks_records import Scope, Subject


class Rule(enum.StrEnum):
    USAGE_SPIKE = "usage_spike"
    REFUSAL_BURST = "refusal_burst"
    USER_FANOUT = "user_fanout"


class Step(enum.StrEnum):
    """What the detector does about a finding, in escalating order; a tenant's policy
    names the highest step it may take."""

    FLAG = "flag"  # record, log, count: nothing else
    TIGHTEN = "tighten"  # add detector limits (the smallest unexpired limit applies)
    BLOCK = "block"  # block the subject for a period


@dataclass(frozen=True, slots=True)
class UserHour:
    """One user's last hour next to their baseline days (sums over those days)."""

    tenant: str
    user_id: str
    caller: str  # the caller that made most of the hour's calls
    tokens: int
    spend_micros: int
    baseline_tokens: int
    baseline_spend_micros: int
    # Whole days the baseline spans: from the user's first day in it to yesterday (fewer
    # than baseline_days for a user who started lately; 0 without any).
    baseline_days: int = 7


@dataclass(frozen=True, slots=True)
class CallerHour:
    """One caller's last hour next to its baseline days (sums over those days)."""

    tenant: str
    caller: str
    tokens: int
    spend_micros: int
    baseline_tokens: int
    baseline_spend_micros: int
    baseline_days: int  # from its first day in the baseline to yesterday; 0: no history


@dataclass(frozen=True, slots=True)
class CallerCount:
    """A count for one caller of a tenant (refusals in five minutes, new users in an hour)."""

    tenant: str
    caller: str
    count: int
    # Refusals: the user with the most of them, and how many (edge counts name no user).
    top_user: str = ""
    top_user_count: int = 0


@dataclass(frozen=True, slots=True)
class Finding:
    subject: Subject
    rule: Rule
    measure: str  # tokens | spend_usd_micros | refusals | new_users
    observed: int
    usual: float  # per hour for spikes; 0 where the rule has no baseline
    threshold: float
    detail: str
    # What tightening means for this finding: limits of the subject, by kind.
    tighten: tuple[tuple[LimitKind, int], ...] = ()

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (*self.subject.key, self.rule.value)


def usage_spikes(hours: Iterable[UserHour], s: DetectorSettings) -> list[Finding]:
    """The users whose last hour is far above their own baseline (see the module docstring)."""
    found = []
    for h in hours:
        days = max(1, min(h.baseline_days, s.baseline_days))
        finding = _hour_spike(
            Subject(Scope.USER, h.tenant, h.user_id),
            (h.tokens, h.spend_micros),
            (h.baseline_tokens, h.baseline_spend_micros),
            days,
            s,
            how=("", f"; mostly through caller {h.caller}"),
        )
        if finding is not None:
            found.append(finding)
    return found


def caller_spikes(hours: Iterable[CallerHour], s: DetectorSettings) -> list[Finding]:
    """The callers whose last hour is far above their own baseline; callers without one
    are left to the per-user rule (see the module docstring)."""
    found = []
    for h in hours:
        if h.baseline_days < 1:
            continue
        finding = _hour_spike(
            Subject(Scope.CALLER, h.tenant, h.caller),
            (h.tokens, h.spend_micros),
            (h.baseline_tokens, h.baseline_spend_micros),
            min(h.baseline_days, s.baseline_days),
            s,
            how=(" through this caller", ""),
        )
        if finding is not None:
            found.append(finding)
    return found


def _hour_spike(
    subject: Subject,
    hour: tuple[int, int],
    baseline: tuple[int, int],
    days: int,
    s: DetectorSettings,
    how: tuple[str, str],
) -> Finding | None:
    """The spike finding for one subject's last hour (tokens, spend) against its
    baseline days' sums, or None; ``how`` words the detail around the amounts."""
    (tokens, spend), (baseline_tokens, baseline_spend) = hour, baseline
    span_hours = days * 24
    fired = _strongest(
        _spike(tokens, baseline_tokens / span_hours, s.spike_factor, s.token_floor, "tokens"),
        _spike(spend, baseline_spend / span_hours, s.spike_factor, s.spend_floor_micros, "spend_usd_micros"),
    )
    if fired is None:
        return None
    measure, observed, usual, threshold = fired
    where, after = how
    return Finding(
        subject,
        Rule.USAGE_SPIKE,
        measure,
        observed,
        usual,
        threshold,
        f"{_amount(measure, observed)} in the last hour{where}, usually {_amount(measure, usual)} an hour "
        f"(over {days} day{'s' if days > 1 else ''}){after}",
        tighten=(
            (LimitKind.TOKENS_PER_DAY, _half_daily(baseline_tokens, days, s.token_floor)),
            (LimitKind.SPEND_PER_DAY, _half_daily(baseline_spend, days, s.spend_floor_micros)),
        ),
    )


def refusal_bursts(
    counts: Iterable[CallerCount], hour_requests: dict[tuple[str, str], int], s: DetectorSettings
) -> list[Finding]:
    """Callers with at least ``refusal_burst`` refused calls in five minutes — or, when one
    user made at least half of them, that user: a service calling for many end users
    should not be tightened or blocked for one of them."""
    found = []
    for c in counts:
        if c.count < s.refusal_burst:
            continue
        threshold = float(s.refusal_burst)
        if c.top_user and 2 * c.top_user_count >= c.count:
            found.append(
                Finding(
                    Subject(Scope.USER, c.tenant, c.top_user),
                    Rule.REFUSAL_BURST,
                    "refusals",
                    c.top_user_count,
                    0.0,
                    threshold,
                    f"{c.top_user_count} of the {c.count} calls of caller {c.caller} refused in the last"
                    f" 5 minutes (threshold {s.refusal_burst}) were this user's",
                    # Half the rate at which it was refused, per minute.
                    tighten=((LimitKind.REQUESTS_PER_MINUTE, max(1, c.top_user_count // 10)),),
                )
            )
            continue
        found.append(
            Finding(
                Subject(Scope.CALLER, c.tenant, c.caller),
                Rule.REFUSAL_BURST,
                "refusals",
                c.count,
                0.0,
                threshold,
                f"{c.count} calls refused in the last 5 minutes (threshold {s.refusal_burst})",
                tighten=_half_rate(hour_requests.get((c.tenant, c.caller), 0)),
            )
        )
    return found


def user_fanouts(
    counts: Iterable[CallerCount], hour_requests: dict[tuple[str, str], int], s: DetectorSettings
) -> list[Finding]:
    """Callers that brought at least ``new_users`` new user ids in the last hour."""
    return [
        Finding(
            Subject(Scope.CALLER, c.tenant, c.caller),
            Rule.USER_FANOUT,
            "new_users",
            c.count,
            0.0,
            float(s.new_users),
            f"{c.count} user ids new to the tenant in the last hour (threshold {s.new_users})",
            tighten=_half_rate(hour_requests.get((c.tenant, c.caller), 0)),
        )
        for c in counts
        if c.count >= s.new_users
    ]


def step_for(ceiling: Step, acted_before: bool) -> Step:
    """The step to take under a tenant's ``ceiling``: ``block`` tightens first and blocks
    a subject the detector already acted on within the escalation memory."""
    if ceiling is Step.BLOCK and not acted_before:
        return Step.TIGHTEN
    return ceiling


def _spike(
    observed: int, usual: float, factor: float, floor: int, measure: str
) -> tuple[str, int, float, float] | None:
    threshold = max(factor * usual, float(floor))
    return (measure, observed, usual, threshold) if observed > threshold else None


def _strongest(*candidates: tuple[str, int, float, float] | None) -> tuple[str, int, float, float] | None:
    """Of the measures that fired, the one furthest above its threshold."""
    fired = [c for c in candidates if c is not None]
    return max(fired, key=lambda c: c[1] / max(c[3], 1)) if fired else None


def _half_daily(baseline_total: int, days: int, floor: int) -> int:
    """Half the usual daily amount — never below the hourly floor, so a subject with no
    baseline (a new user) is slowed, not cut to nothing."""
    return max(math.ceil(baseline_total / days / 2), floor, 1)


def _half_rate(hour_requests: int) -> tuple[tuple[LimitKind, int], ...]:
    """Half the caller's request rate over the last hour, per minute."""
    return ((LimitKind.REQUESTS_PER_MINUTE, max(1, hour_requests // 120)),)


def _amount(measure: str, value: float) -> str:
    if measure == "spend_usd_micros":
        return f"${value / 1_000_000:.2f}"
    return f"{value:,.0f} tokens"
