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
    assert not bucket.take(1, 0.0, live=3)  # no burst on going away: only the share's refill
    assert not bucket.take(1, 2.0, live=3)
    assert bucket.take(1, 3.0, live=3)  # refills at 1/s ÷ 3
    assert not bucket.take(1, 3.0, live=3)
    assert sum(bucket.take(1, 600.0, live=3) for _ in range(100)) == 20  # holds capacity / 3 at most


def test_flapping_between_away_and_back_adds_no_burst() -> None:
    bucket = BucketAccount(60, now=0.0)  # one per second
    admitted = 0
    for flap in range(10):  # away for 3 s, back, away again...
        start = flap * 3.0
        admitted += sum(bucket.take(1, start, live=3) for _ in range(50))
        admitted += sum(bucket.take(1, start + 3.0, live=3) for _ in range(50))
        bucket.reconnected()
    assert admitted == 10  # the share's rate (1/3 per s) over 30 s; a burst per flap was 200


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


# --- decisions pinned by mutation testing (docs/TESTING.md) --------------------------


def test_the_first_take_asks_for_what_the_call_needs_and_no_more() -> None:
    bucket = BucketAccount(6000, now=100.0)
    assert not bucket.take(5, 100.0)  # nothing held yet
    bucket.pending = 5
    assert bucket.plan(100.0, live=1, horizon_s=4.0, idle_s=2.0) == BucketTake(5, 0.0)


def test_demand_is_measured_over_the_time_since_the_last_take() -> None:
    bucket = BucketAccount(6000, now=100.0)  # 100 per second
    bucket.held = 20.0
    for i in range(20):  # 20 calls over 2 s: 10 per second
        assert bucket.take(1, 100.0 + 2.0 * (i + 1) / 20)
    take = bucket.plan(102.0, live=1, horizon_s=4.0, idle_s=2.0)
    assert bucket.rate == 10
    assert take == BucketTake(1 + 40, 0.0)  # one call + 4 s × 10/s


def test_a_slice_between_one_and_two_slices_is_kept_whole() -> None:
    bucket = BucketAccount(6000, now=0.0)
    bucket.last_take, bucket.last_need = 0.0, 4
    bucket.held = 6.0  # one slice is 4 (no demand measured): 6 is less than two
    assert bucket.plan(0.5, live=1, horizon_s=4.0, idle_s=2.0) == BucketTake(0, 0.0)
    assert bucket.held == 6.0


def test_a_cancelled_reservation_goes_back_to_the_slice() -> None:
    bucket = BucketAccount(600, now=0.0)
    bucket.held = 10.0
    assert bucket.take(4, 0.1)
    bucket.cancel(4)
    assert bucket.held == 10.0


def test_a_lost_take_keeps_settlements_made_while_it_was_under_way() -> None:
    bucket = BucketAccount(600, now=0.0)
    bucket.held = -4.0
    take = bucket.plan(0.0, live=1, horizon_s=4.0, idle_s=2.0)  # pays the debt
    bucket.settle(5, 2)  # a call ends meanwhile: 3 unused come back
    bucket.failed(take)
    assert bucket.held == -1.0  # the debt is still owed, the 3 are still here


def test_while_away_alone_the_local_bucket_is_the_whole_limit_at_its_rate() -> None:
    bucket = BucketAccount(120, now=10.0)  # 2 per second
    assert not bucket.take(1, 10.0, live=1)
    assert not bucket.take(1, 10.4, live=1)
    assert bucket.take(1, 10.5, live=1)  # 0.5 s × 2/s: one token
    assert not bucket.take(1, 10.5, live=1)
    assert sum(bucket.take(1, 500.0, live=1) for _ in range(200)) == 120  # the whole capacity at most


def test_after_reconnecting_a_later_outage_starts_a_fresh_empty_local_bucket() -> None:
    bucket = BucketAccount(60, now=0.0)
    assert sum(bucket.take(1, 0.0, live=3) for _ in range(30)) == 0
    assert sum(bucket.take(1, 60.0, live=3) for _ in range(30)) == 20  # filled up while away
    bucket.reconnected()
    assert sum(bucket.take(1, 60.0, live=3) for _ in range(30)) == 0  # not carried over
    assert sum(bucket.take(1, 63.0, live=3) for _ in range(30)) == 1


def test_the_shared_level_refills_at_the_limits_rate() -> None:
    bucket = BucketAccount(120, now=0.0)  # 2 per second
    bucket.applied(BucketTake(0, 0.0), 0, 10.0, 50.0)
    assert bucket.level_now(53.0) == 16.0
    assert bucket.level_now(500.0) == 120.0


def test_retry_after_counts_the_slice_held_and_the_rate() -> None:
    bucket = BucketAccount(120, now=0.0)  # 2 per second
    bucket.applied(BucketTake(0, 0.0), 0, 0.0, 0.0)
    assert bucket.retry_after(6, 0.0) == 3.0
    bucket.held = 2.0
    assert bucket.retry_after(6, 0.0) == 2.0  # 2 held: 4 more to refill
    bucket.held = 0.0
    assert bucket.retry_after(120, 0.0) == 60.0  # the whole bucket fits, once full
    assert bucket.retry_after(1, 10.0) == 0.05  # fits already: the floor


def test_estimate_remaining_is_the_level_and_the_slice_held() -> None:
    bucket = BucketAccount(120, now=0.0)
    bucket.applied(BucketTake(0, 0.0), 0, 10.0, 0.0)
    bucket.held = 3.0
    assert bucket.estimate_remaining(1.0) == 15  # 10 + 2 refilled + 3 held
    bucket.held = -5.0
    assert bucket.estimate_remaining(1.0) == 12  # a debt is not counted twice
    bucket.applied(BucketTake(0, 0.0), 0, 0.0, 1.0)
    bucket.held = 0.0
    assert bucket.estimate_remaining(1.0) == 0
