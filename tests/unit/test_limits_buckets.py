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


def spending(bucket: BucketAccount, calls: int, until: float) -> None:
    """``calls`` calls of one token each over (0, until], from a slice big enough."""
    bucket.held = float(calls)
    for i in range(calls):
        assert bucket.take(1, until * (i + 1) / calls)


def test_a_take_tops_the_slice_up_to_the_demand_of_the_horizon() -> None:
    bucket = BucketAccount(6000, now=0.0)  # 100 per second
    bucket.applied(BucketTake(0, 0.0), 0, 6000.0, 0.0)
    spending(bucket, 20, 1.0)
    bucket.held = 3.0
    take = bucket.plan(1.0, live=1, horizon_s=4.0, idle_s=2.0)
    # slice = one call + 4 s × 20/s = 81; 3 held: ask for 78
    assert take == BucketTake(78, 0.0)
    assert bucket.rate == 20
    bucket.applied(take, 78, 5922.0, 1.0)
    assert bucket.held == 81 and bucket.level == 5922.0


def test_a_bucket_near_empty_gives_small_slices() -> None:
    for live, want in ((1, 1 + 10 - 3), (2, 1 + 5 - 3)):
        bucket = BucketAccount(6000, now=0.0)
        bucket.applied(BucketTake(0, 0.0), 0, 20.0, 0.0)
        spending(bucket, 20, 1.0)
        bucket.level, bucket.level_at = 20.0, 1.0
        bucket.held = 3.0
        take = bucket.plan(1.0, live=live, horizon_s=4.0, idle_s=2.0)
        assert take == BucketTake(want, 0.0), live  # 1 + level // (2 × live), less what it holds


def test_too_much_held_goes_back_beyond_two_slices() -> None:
    bucket = BucketAccount(6000, now=0.0)
    spending(bucket, 20, 1.0)
    bucket.held = 200.0
    take = bucket.plan(1.0, live=1, horizon_s=4.0, idle_s=2.0)
    assert take == BucketTake(0, 200.0 - 2 * 81)
    assert bucket.held == 2 * 81


def test_demand_decays_and_idle_starts_at_idle_s() -> None:
    bucket = BucketAccount(6000, now=0.0)
    spending(bucket, 20, 1.0)
    bucket.held = 2.0
    bucket.plan(1.0, live=1, horizon_s=4.0, idle_s=2.0)
    bucket.plan(2.9, live=1, horizon_s=4.0, idle_s=2.0)
    assert bucket.rate == 10
    held = bucket.held
    assert bucket.plan(3.0, live=1, horizon_s=4.0, idle_s=2.0) == BucketTake(0, held)
    assert bucket.held == 0 and bucket.idle(3.0, 2.0) and not bucket.idle(2.9, 2.0)


def test_a_debt_is_paid_and_stays_owed_when_the_take_is_lost() -> None:
    bucket = BucketAccount(600, now=0.0)
    bucket.held = -4.0
    take = bucket.plan(0.0, live=1, horizon_s=4.0, idle_s=2.0)
    assert take.back == -4.0 and bucket.held == 0
    bucket.failed(take)
    assert bucket.held == -4.0
    bucket.held = 0.0
    bucket.failed(BucketTake(0, 0.0))
    assert bucket.held == 0.0


def test_worth_a_take_when_low_or_idle_with_something_held() -> None:
    bucket = BucketAccount(6000, now=0.0)
    bucket.last_take, bucket.rate, bucket.last_need = 1.0, 10.0, 1
    bucket.held = 5.0
    assert bucket.worth_syncing(1.5, idle_s=2.0)  # 2 × 5 < 1 + 10
    bucket.held = 5.5
    assert not bucket.worth_syncing(1.5, idle_s=2.0)  # 11 is not < 11
    assert bucket.worth_syncing(3.0, idle_s=2.0)  # idle, holding 5.5
    bucket.held = 0.0
    assert not bucket.worth_syncing(3.0, idle_s=2.0)
    assert bucket.worth_syncing(2.9, idle_s=2.0)  # in use, holding nothing
