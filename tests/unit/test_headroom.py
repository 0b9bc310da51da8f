"""Rate-limit headroom from response headers, and the router steering by it."""

from __future__ import annotations

import pytest

from chatgate_server.upstream.breaker import CircuitBreaker
from chatgate_server.upstream.deployment import Deployment
from chatgate_server.upstream.headroom import Headroom, parse_duration
from chatgate_server.upstream.router import Route, Router
from tests.unit.test_router import Clock, FakeUpstream


def headers(**values: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in values.items()]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0.5", 0.5),
        ("soon", None),
        ("", None),
    ],
)
def test_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_openai_headers_give_the_smaller_share_left_until_their_reset() -> None:
    clock = Clock()
    room = Headroom(clock)
    assert room.fraction() == 1.0  # nothing known: full
    room.observe(
        headers(
            x_ratelimit_limit_requests="100",
            x_ratelimit_remaining_requests="40",
            x_ratelimit_reset_requests="30s",
            x_ratelimit_limit_tokens="10000",
            x_ratelimit_remaining_tokens="9000",
            x_ratelimit_reset_tokens="6s",
        ),
        200,
    )
    assert room.fraction() == pytest.approx(0.4)
    assert room.fraction(in_flight=20) == pytest.approx(0.2)  # our running calls take from it
    clock.now += 31
    assert room.fraction() == 1.0  # the window refilled


def test_a_429_cools_the_deployment_down_for_its_retry_after() -> None:
    clock = Clock()
    room = Headroom(clock)
    room.observe(headers(retry_after_ms="2500", retry_after="3"), 429)
    assert room.cooling and room.fraction() == 0.0
    clock.now += 2.4
    assert room.cooling
    clock.now += 0.2
    assert not room.cooling and room.fraction() == 1.0
    room.observe(headers(), 429)  # no hint: a short default
    assert room.cooling


def test_azure_remaining_counts_without_a_reset_last_a_minute() -> None:
    clock = Clock()
    room = Headroom(clock)
    room.observe(headers(x_ratelimit_remaining_requests="3", x_ratelimit_remaining_tokens="500"), 200)
    assert room.fraction() == 1.0  # no limit known: a share of itself
    assert room.fraction(in_flight=3) == 0.0
    clock.now += 61
    assert room.fraction(in_flight=3) == 1.0


def deployment(name: str, clock: Clock, weight: float = 1.0) -> Deployment:
    breaker = CircuitBreaker(name, clock=clock)
    return Deployment(name, FakeUpstream(), breaker, weight=weight, headroom=Headroom(clock))


def test_an_ordered_route_tries_a_deployment_nearly_out_of_headroom_last() -> None:
    clock = Clock()
    a, b = deployment("a", clock), deployment("b", clock)
    router = Router([a, b], {"m": Route("m", "m", (a, b))})
    assert [c.deployment.name for c in router.plan("m").candidates] == ["a", "b"]
    a.headroom.observe(headers(x_ratelimit_limit_requests="100", x_ratelimit_remaining_requests="4"), 200)
    assert [c.deployment.name for c in router.plan("m").candidates] == ["b", "a"]
    b.headroom.cool_down(5)
    assert [c.deployment.name for c in router.plan("m").candidates] == ["a", "b"]  # a has 4 %, b none


def test_a_weighted_draw_goes_by_weight_times_headroom() -> None:
    clock = Clock()
    a, b = deployment("a", clock, weight=1), deployment("b", clock, weight=1)
    a.headroom.observe(headers(x_ratelimit_limit_requests="100", x_ratelimit_remaining_requests="25"), 200)
    points = iter(i / 100 for i in range(100))
    router = Router([a, b], {"m": Route("m", "m", (a, b), weighted=True)}, rng=lambda: next(points))
    first = [router.plan("m").candidates[0].deployment.name for _ in range(100)]
    assert first.count("a") == 20  # 0.25 / (0.25 + 1)


def test_header_names_in_any_case() -> None:
    clock = Clock()
    room = Headroom(clock)
    room.observe([(b"X-RateLimit-Remaining-Requests", b"1"), (b"X-RateLimit-Limit-Requests", b"100")], 200)
    assert room.fraction() == pytest.approx(0.01)
    room.observe([(b"Retry-After", b"2")], 429)
    clock.now += 1.9
    assert room.cooling


def test_a_limit_and_reset_without_a_remaining_count_reads_as_full() -> None:
    room = Headroom(Clock())
    room.observe(headers(x_ratelimit_limit_requests="100", x_ratelimit_reset_requests="30s"), 200)
    assert room.fraction() == 1.0


def test_a_figure_is_forgotten_at_its_reset_instant() -> None:
    clock = Clock()
    room = Headroom(clock)
    room.observe(
        headers(
            x_ratelimit_limit_requests="100",
            x_ratelimit_remaining_requests="10",
            x_ratelimit_reset_requests="30s",
        ),
        200,
    )
    clock.now += 29.999
    assert room.fraction() == pytest.approx(0.1)
    clock.now = 130.0
    assert room.fraction() == 1.0


def test_azure_counts_are_trusted_for_exactly_a_minute_and_a_new_count_starts_a_new_one() -> None:
    clock = Clock()
    room = Headroom(clock)
    room.observe(headers(x_ratelimit_remaining_requests="0"), 200)
    clock.now = 159.999
    assert room.fraction() == 0.0
    clock.now = 160.0
    assert room.fraction() == 1.0  # the minute is over
    room.observe(headers(x_ratelimit_remaining_requests="0"), 200)  # a count at that very instant
    assert room.fraction() == 0.0


def test_one_request_left_of_an_unknown_limit_is_all_of_it() -> None:
    room = Headroom(Clock())
    room.observe(headers(x_ratelimit_remaining_requests="1"), 200)
    assert room.fraction() == 1.0


def test_zero_left_is_no_headroom_and_an_unreadable_or_negative_count_is_ignored() -> None:
    room = Headroom(Clock())
    room.observe(headers(x_ratelimit_limit_requests="100", x_ratelimit_remaining_requests="0"), 200)
    assert room.fraction() == 0.0
    for bad in ("-5", "nan", "lots"):
        room = Headroom(Clock())
        room.observe(headers(x_ratelimit_limit_requests="100", x_ratelimit_remaining_requests=bad), 200)
        assert room.fraction() == 1.0, bad


def test_other_headers_in_between_are_skipped_not_the_end_of_reading() -> None:
    clock = Clock()
    room = Headroom(clock)
    room.observe(
        [
            (b"content-type", b"text/event-stream"),
            (b"retry-after", b"1"),
            (b"x-ratelimit-limit-requests", b"100"),
            (b"x-ratelimit-remaining-requests", b"20"),
        ],
        429,
    )
    clock.now += 1  # the 429's cool-down over
    assert room.fraction() == pytest.approx(0.2)


def test_retry_after_ms_wins_in_either_order_to_the_millisecond() -> None:
    for order in (
        ((b"retry-after", b"3"), (b"retry-after-ms", b"2500")),
        (
            (b"retry-after-ms", b"2500"),
            (b"retry-after", b"3"),
        ),
    ):
        clock = Clock()
        room = Headroom(clock)
        room.observe(list(order), 429)
        clock.now += 2.499
        assert room.cooling
        clock.now = 102.5
        assert not room.cooling and room.fraction() == 1.0  # over at the instant it ends


def test_a_short_retry_after_cools_only_that_long() -> None:
    clock = Clock()
    room = Headroom(clock)
    room.observe(headers(retry_after_ms="200"), 429)
    clock.now += 0.3
    assert not room.cooling
