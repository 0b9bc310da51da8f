"""A process's slice of a shared token bucket (rates), and the windows of budgets."""

from __future__ import annotations

from datetime import UTC, datetime

from chatgate_server.domain import LimitKind
from chatgate_server.limits.buckets import BucketAccount, BucketTake
from chatgate_server.limits.definitions import Target, window


def test_takes_spend_the_slice_and_settlement_returns_the_unused_part() -> None:
    bucket = BucketAccount(600, now=0.0)
    bucket.applied(BucketTake(10, 0.0), 10, 590.0, 0.0)
    assert bucket.take(8, 0.1)
    assert not bucket.take(3, 0.1)
    bucket.settle(8, 5)
    assert bucket.take(5, 0.2)


def test_a_settlement_over_the_reservation_is_a_debt_paid_at_the_next_take() -> None:
    bucket = BucketAccount(600, now=0.0)
    bucket.applied(BucketTake(10, 0.0), 10, 590.0, 0.0)
    bucket.take(10, 0.1)
    bucket.settle(10, 14)
    take = bucket.plan(0.2, live=1, horizon_s=2.0, idle_s=2.0)
    assert take.back == -4 and take.want >= 1


def test_idle_slices_go_back_and_a_lost_answer_does_not_restore_them() -> None:
    bucket = BucketAccount(600, now=0.0)
    bucket.applied(BucketTake(50, 0.0), 50, 550.0, 0.0)
    take = bucket.plan(5.0, live=1, horizon_s=2.0, idle_s=2.0)
    assert take == BucketTake(0, 50.0)
    bucket.failed(take)
    assert not bucket.take(1, 5.0)


def test_retry_after_is_the_refill_time_and_none_when_it_can_never_fit() -> None:
    bucket = BucketAccount(60, now=0.0)  # one per second
    bucket.applied(BucketTake(0, 0.0), 0, 0.0, 0.0)
    assert bucket.retry_after(3, 0.0) == 3.0
    assert bucket.retry_after(3, 2.0) == 1.0
    assert bucket.retry_after(61, 0.0) is None


def test_while_postgres_is_away_a_local_bucket_runs_at_the_share_of_the_rate() -> None:
    bucket = BucketAccount(60, now=0.0)
    admitted = sum(bucket.take(1, 0.0, live=3) for _ in range(100))
    assert admitted == 20  # a burst of capacity / 3
    assert not bucket.take(1, 2.0, live=3)
    assert bucket.take(1, 3.0, live=3)  # refills at 1/s ÷ 3


def test_windows_are_utc_days_and_calendar_months() -> None:
    at = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    day = window(LimitKind.TOKENS_PER_DAY, at)
    assert (day.name, day.ends_at) == ("2026-12-31", datetime(2027, 1, 1, tzinfo=UTC))
    month = window(LimitKind.SPEND_PER_MONTH, at)
    assert (month.name, month.ends_at) == ("2026-12", datetime(2027, 1, 1, tzinfo=UTC))
    assert window(LimitKind.CONCURRENT_STREAMS, at).ends_at is None


def test_targets_parse_as_operators_type_them() -> None:
    assert Target.parse("user", "acme/*").label == "user:acme/*"
    assert Target.parse("caller", "acme/billing", "gpt-4o").label == "caller:acme/billing/model:gpt-4o"
    assert Target.parse("tenant", "acme").label == "tenant:acme"
    for scope, who in (("tenant", "acme/x"), ("user", "acme"), ("caller", "acme/*"), ("user", "/u")):
        try:
            Target.parse(scope, who)
        except ValueError:
            continue
        raise AssertionError(f"{scope} {who} parsed")
