"""The detector's rules on aggregates: what is a finding, what is not, and the steps."""

from __future__ import annotations

import pytest

from chatgate_server.domain import LimitKind
from chatgate_server.limits.anomaly_rules import (
    CallerCount,
    CallerHour,
    Finding,
    Rule,
    Step,
    UserHour,
    caller_spikes,
    refusal_bursts,
    step_for,
    usage_spikes,
    user_fanouts,
)
from chatgate_server.limits.anomaly_settings import DetectorSettings
from chatgate_server.limits.blocks_records import Scope, Subject

S = DetectorSettings(spike_factor=10, baseline_days=7, token_floor=20_000, spend_floor_micros=1_000_000)
DAY = 240_000  # tokens a day: 10 000 an hour on average


def hour(
    tokens: int, baseline_per_day: int = DAY, spend: int = 0, baseline_spend_per_day: int = 0
) -> UserHour:
    return UserHour("acme", "u-1", "billing", tokens, spend, 7 * baseline_per_day, 7 * baseline_spend_per_day)


def test_a_user_at_their_usual_busy_hour_is_not_a_finding() -> None:
    # 30 000 tokens: three times the mean hour (a working day's busy hour), above the floor.
    assert usage_spikes([hour(30_000)], S) == []


def test_a_spike_far_above_the_users_own_baseline_is_a_finding() -> None:
    (found,) = usage_spikes([hour(500_000)], S)
    assert found.subject == Subject(Scope.USER, "acme", "u-1")
    assert (found.rule, found.measure, found.observed) == (Rule.USAGE_SPIKE, "tokens", 500_000)
    assert found.usual == pytest.approx(10_000)
    assert found.threshold == pytest.approx(100_000)
    assert "500,000 tokens in the last hour, usually 10,000 tokens an hour" in found.detail
    assert "caller billing" in found.detail
    # Tightening: half the usual day.
    assert dict(found.tighten)[LimitKind.TOKENS_PER_DAY] == DAY // 2


def test_just_above_k_times_the_baseline_is_a_finding_and_just_below_is_not() -> None:
    assert usage_spikes([hour(100_000)], S) == []
    assert len(usage_spikes([hour(100_001)], S)) == 1


def test_a_slow_ramp_is_not_a_finding() -> None:
    # Usage grows by a fifth every day for the 7 baseline days and keeps growing today;
    # the current hour is twice today's mean hour. The trailing mean follows the ramp,
    # so the hour is about 4x its mean hour: well under the factor of 10.
    days = [round(DAY * 1.2**i) for i in range(7)]
    today_hourly = DAY * 1.2**7 / 24
    ramp = UserHour("acme", "u-ramp", "billing", round(2 * today_hourly), 0, sum(days), 0)
    assert usage_spikes([ramp], S) == []
    assert ramp.tokens / (sum(days) / (7 * 24)) < S.spike_factor


def test_a_user_first_seen_two_days_ago_has_a_two_day_baseline_not_a_diluted_week() -> None:
    recent = UserHour("acme", "u-2d", "billing", 90_000, 0, 2 * DAY, 0, baseline_days=2)
    assert usage_spikes([recent], S) == []  # 9x their mean hour: not a spike
    (found,) = usage_spikes([UserHour("acme", "u-2d", "billing", 150_000, 0, 2 * DAY, 0, baseline_days=2)], S)
    assert found.usual == pytest.approx(10_000) and "(over 2 days)" in found.detail


def test_a_new_user_below_the_floor_is_not_a_finding_above_it_is() -> None:
    assert usage_spikes([hour(19_000, baseline_per_day=0)], S) == []
    (found,) = usage_spikes([hour(25_000, baseline_per_day=0)], S)
    assert found.usual == 0 and found.threshold == S.token_floor
    # Tightening a user without a baseline slows them to the floor, never to zero.
    assert dict(found.tighten)[LimitKind.TOKENS_PER_DAY] == S.token_floor


def test_spend_spikes_count_and_the_stronger_signal_is_reported() -> None:
    h = hour(30_000, spend=50_000_000, baseline_spend_per_day=2_400_000)  # $50 vs $0.10/hour usual
    (found,) = usage_spikes([h], S)
    assert found.measure == "spend_usd_micros"
    assert "$50.00 in the last hour, usually $0.10 an hour" in found.detail


def test_refusal_bursts_at_the_threshold() -> None:
    s = DetectorSettings(refusal_burst=300)
    counts = [CallerCount("acme", "billing", 300), CallerCount("acme", "search", 299)]
    (found,) = refusal_bursts(counts, {("acme", "billing"): 1200}, s)
    assert found.subject == Subject(Scope.CALLER, "acme", "billing")
    assert found.rule is Rule.REFUSAL_BURST
    assert found.tighten == ((LimitKind.REQUESTS_PER_MINUTE, 10),)  # 1200 an hour = 20/min; half


def test_a_burst_mostly_of_one_user_is_that_users_not_the_callers() -> None:
    s = DetectorSettings(refusal_burst=300)
    (found,) = refusal_bursts([CallerCount("acme", "shared", 400, top_user="u-9", top_user_count=200)], {}, s)
    assert found.subject == Subject(Scope.USER, "acme", "u-9")
    assert found.observed == 200 and "200 of the 400 calls of caller shared" in found.detail
    assert found.tighten == ((LimitKind.REQUESTS_PER_MINUTE, 20),)  # 40/min refused; half
    (spread,) = refusal_bursts(
        [CallerCount("acme", "shared", 400, top_user="u-9", top_user_count=199)], {}, s
    )
    assert spread.subject == Subject(Scope.CALLER, "acme", "shared")


def test_fanouts_at_the_threshold() -> None:
    s = DetectorSettings(new_users=100)
    (found,) = user_fanouts([CallerCount("acme", "signup", 150), CallerCount("acme", "x", 20)], {}, s)
    assert (found.subject.name, found.rule, found.observed) == ("signup", Rule.USER_FANOUT, 150)
    assert found.tighten == ((LimitKind.REQUESTS_PER_MINUTE, 1),)


@pytest.mark.parametrize(
    ("ceiling", "acted_before", "step"),
    [
        (Step.FLAG, False, Step.FLAG),
        (Step.FLAG, True, Step.FLAG),
        (Step.TIGHTEN, False, Step.TIGHTEN),
        (Step.TIGHTEN, True, Step.TIGHTEN),
        (Step.BLOCK, False, Step.TIGHTEN),  # first, tighten
        (Step.BLOCK, True, Step.BLOCK),  # found again after an action: block
    ],
)
def test_escalation_steps(ceiling: Step, acted_before: bool, step: Step) -> None:
    assert step_for(ceiling, acted_before) is step


def test_a_user_first_seen_yesterday_is_measured_against_one_day() -> None:
    # baseline_days 1: the mean hour is a day's total over 24 hours, and the detail says "1 day".
    (found,) = usage_spikes([UserHour("acme", "u-1d", "billing", 150_000, 0, DAY, 0, baseline_days=1)], S)
    assert found.usual == pytest.approx(10_000) and "(over 1 day);" in found.detail
    # No baseline day at all still divides by one day, never by zero.
    (new,) = usage_spikes([UserHour("acme", "u-0d", "billing", 150_000, 0, DAY, 0, baseline_days=0)], S)
    assert new.usual == pytest.approx(10_000)


def test_every_spiking_user_is_found_not_only_those_before_a_quiet_one() -> None:
    quiet = UserHour("acme", "u-q", "billing", 1_000, 0, 7 * DAY, 0)
    loud = UserHour("acme", "u-l", "billing", 500_000, 0, 7 * DAY, 0)
    assert [f.subject.name for f in usage_spikes([quiet, loud, quiet, loud], S)] == ["u-l", "u-l"]


def test_when_tokens_and_spend_both_spike_the_larger_multiple_of_its_threshold_is_reported() -> None:
    # Tokens 1.5x their threshold, spend 50x its floor: spend.
    (found,) = usage_spikes([hour(150_000, spend=50_000_000)], S)
    assert (found.measure, found.observed, found.threshold) == ("spend_usd_micros", 50_000_000, 1_000_000)
    # Tokens 20x, spend 1.1x: tokens.
    (found,) = usage_spikes([hour(2_000_000, spend=1_100_000)], S)
    assert (found.measure, found.observed, found.threshold) == ("tokens", 2_000_000, 100_000)
    # A threshold of zero (a zero floor, no baseline) counts as one, not as two.
    zero = DetectorSettings(spike_factor=10, token_floor=0, spend_floor_micros=2)
    (found,) = usage_spikes([hour(3, baseline_per_day=0, spend=5)], zero)
    assert found.measure == "tokens"


def test_tightening_a_user_without_baseline_under_a_zero_floor_allows_one_token_not_none() -> None:
    zero = DetectorSettings(token_floor=0, spend_floor_micros=0)
    (found,) = usage_spikes([hour(5, baseline_per_day=0, spend=5)], zero)
    assert dict(found.tighten) == {LimitKind.TOKENS_PER_DAY: 1, LimitKind.SPEND_PER_DAY: 1}


def test_large_spend_is_shown_in_dollars_to_the_cent() -> None:
    (found,) = usage_spikes([hour(0, spend=10_000_000_000)], S)
    assert found.detail.startswith("$10000.00 in the last hour, usually $0.00 an hour (over 7 days)")


def test_a_refusal_burst_finding_in_full() -> None:
    s = DetectorSettings(refusal_burst=300)
    counts = [
        CallerCount("acme", "search", 299),  # below: skipped, the next ones still looked at
        CallerCount("acme", "shared", 410, top_user="u-9", top_user_count=205),
        CallerCount("acme", "billing", 300),
    ]
    user, caller = refusal_bursts(counts, {("acme", "billing"): 1300}, s)
    assert user == Finding(
        Subject(Scope.USER, "acme", "u-9"),
        Rule.REFUSAL_BURST,
        "refusals",
        205,
        0.0,
        300.0,
        "205 of the 410 calls of caller shared refused in the last 5 minutes (threshold 300)"
        " were this user's",
        tighten=((LimitKind.REQUESTS_PER_MINUTE, 20),),  # whole requests: 205 // 10
    )
    assert caller == Finding(
        Subject(Scope.CALLER, "acme", "billing"),
        Rule.REFUSAL_BURST,
        "refusals",
        300,
        0.0,
        300.0,
        "300 calls refused in the last 5 minutes (threshold 300)",
        tighten=((LimitKind.REQUESTS_PER_MINUTE, 10),),  # 1300 an hour: 10 whole requests a minute
    )
    for found in (user, caller):
        assert all(type(n) is int for _, n in found.tighten)


def test_a_small_burst_of_one_user_is_slowed_to_one_request_a_minute() -> None:
    (found,) = refusal_bursts(
        [CallerCount("acme", "shared", 20, top_user="u-9", top_user_count=10)],
        {},
        DetectorSettings(refusal_burst=20),
    )
    assert found.subject.scope is Scope.USER and found.tighten == ((LimitKind.REQUESTS_PER_MINUTE, 1),)


def test_a_fanout_finding_in_full_at_its_threshold() -> None:
    s = DetectorSettings(new_users=100)
    (found,) = user_fanouts(
        [CallerCount("acme", "x", 99), CallerCount("acme", "signup", 100)], {("acme", "signup"): 2400}, s
    )
    assert found == Finding(
        Subject(Scope.CALLER, "acme", "signup"),
        Rule.USER_FANOUT,
        "new_users",
        100,
        0.0,
        100.0,
        "100 user ids new to the tenant in the last hour (threshold 100)",
        tighten=((LimitKind.REQUESTS_PER_MINUTE, 20),),  # 2400 an hour: 40 a minute, half
    )


def caller_hour(tokens: int, baseline_per_day: int = DAY, days: int = 7, spend: int = 0) -> CallerHour:
    return CallerHour("acme", "reports", tokens, spend, days * baseline_per_day, 0, days)


def test_a_caller_far_above_its_own_baseline_is_a_finding_of_the_caller() -> None:
    assert caller_spikes([caller_hour(30_000)], S) == []  # its busy hour
    assert len(caller_spikes([caller_hour(30_000), caller_hour(100_001)], S)) == 1  # not only the first
    assert caller_spikes([caller_hour(100_000)], S) == []  # 10x its mean hour: not above
    (found,) = caller_spikes([caller_hour(100_001)], S)
    assert found.subject == Subject(Scope.CALLER, "acme", "reports")
    assert (found.rule, found.measure, found.observed, found.threshold) == (
        Rule.USAGE_SPIKE,
        "tokens",
        100_001,
        100_000,
    )
    assert found.usual == pytest.approx(10_000)
    assert "through this caller" in found.detail and "over 7 days" in found.detail
    # Tightening: the caller's tokens per day at half its usual day.
    assert dict(found.tighten)[LimitKind.TOKENS_PER_DAY] == DAY // 2


def test_a_caller_without_history_is_left_to_the_per_user_rule() -> None:
    assert caller_spikes([caller_hour(10_000_000, baseline_per_day=0, days=0)], S) == []


def test_a_callers_short_history_is_its_baseline_and_the_floor_still_holds() -> None:
    # Two days of 24 000 tokens: 1 000 an hour; 10x is below the floor, so the floor rules.
    assert caller_spikes([caller_hour(20_000, baseline_per_day=24_000, days=2)], S) == []
    (found,) = caller_spikes([caller_hour(20_001, baseline_per_day=24_000, days=2)], S)
    assert found.usual == pytest.approx(1_000) and found.threshold == 20_000
    assert "over 2 days" in found.detail


def test_a_caller_with_one_day_of_history_is_judged_and_one_without_does_not_hide_the_next() -> None:
    one_day = caller_hour(30_000, baseline_per_day=24_000, days=1)
    found = caller_spikes([caller_hour(10_000_000, baseline_per_day=0, days=0), one_day], S)
    assert [f.detail for f in found] == [
        "30,000 tokens in the last hour through this caller, usually 1,000 tokens an hour (over 1 day)"
    ]


def test_a_callers_spend_spike_in_full() -> None:
    # $24 a day over a week: $1 an hour; $12.50 in the last hour is over 10x and the floor.
    h = CallerHour("acme", "reports", 0, 12_500_000, 0, 7 * 24_000_000, 7)
    (found,) = caller_spikes([h], S)
    assert (found.measure, found.observed, found.threshold) == ("spend_usd_micros", 12_500_000, 10_000_000)
    assert found.usual == pytest.approx(1_000_000)
    assert found.detail == "$12.50 in the last hour through this caller, usually $1.00 an hour (over 7 days)"
    assert dict(found.tighten)[LimitKind.SPEND_PER_DAY] == 12_000_000  # half its usual day
    assert caller_spikes([CallerHour("acme", "reports", 0, 10_000_000, 0, 7 * 24_000_000, 7)], S) == []
