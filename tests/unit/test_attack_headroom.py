"""An upstream that lies in its rate-limit headers: absurd remaining counts, limits and
resets (negative, NaN, "inf", 1e308, garbage, "99999999h", remaining above the limit)
never raise, never read as more than full or less than empty headroom, never drop a
deployment from a call's plan, and are forgotten within a day; a 429's retry-after
cools a deployment for a minute at most."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from chatgate_server.upstream.headroom import MAX_COOL_DOWN_S, MAX_RESET_S, Headroom, parse_duration
from chatgate_server.upstream.router import Route, Router
from tests.unit.test_router import Clock, deployment

ABSURD = [
    "-1",
    "-0",
    "0",
    "1",
    "1e308",
    "-1e308",
    "1e-320",
    "nan",
    "NaN",
    "-nan",
    "inf",
    "-inf",
    "Infinity",
    "99999999h",
    "99999999999999999999999s",
    "1h-1s",
    "6m0s",
    "  7 ",
    "",
    "garbage",
    "0x10",
    "1_000",
    "\u0661",
    "12abc",
    "1e400",
    "-99999999h",
    "nanms",
]
FIELDS = [
    f"x-ratelimit-{kind}-{which}"
    for which in ("requests", "tokens")
    for kind in ("remaining", "limit", "reset")
] + ["retry-after", "retry-after-ms"]

values = st.one_of(st.sampled_from(ABSURD), st.text(max_size=12), st.floats().map(repr))
header_lists = st.lists(st.tuples(st.sampled_from(FIELDS), values), max_size=10)


def encoded(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode("utf-8", "surrogatepass")) for name, value in pairs]


@settings(max_examples=400, deadline=None)
@given(header_lists, st.sampled_from([200, 429, 500]))
def test_any_headers_leave_headroom_between_empty_and_full_and_forgotten_within_a_day(
    pairs: list[tuple[str, str]], status: int
) -> None:
    clock = Clock()
    room = Headroom(clock)
    room.observe(encoded(pairs), status)
    for in_flight in (0, 1, 10**6):
        share = room.fraction(in_flight)
        assert 0.0 <= share <= 1.0, (pairs, share)  # NaN fails both
    assert room.cool_until <= clock.now + MAX_COOL_DOWN_S
    clock.now += MAX_RESET_S + 1
    assert room.fraction() == 1.0  # no figure outlives a day


@settings(max_examples=200, deadline=None)
@given(header_lists)
def test_a_lying_deployment_stays_in_every_plan(pairs: list[tuple[str, str]]) -> None:
    clock = Clock()
    liar, honest = deployment("liar", clock), deployment("honest", clock)
    liar.headroom = Headroom(clock)
    liar.headroom.observe(encoded(pairs), 200)
    router = Router([liar, honest], {"m": Route("m", "gpt-4o", (liar, honest), weighted=True)})
    for _ in range(3):
        names = [c.deployment.name for c in router.plan("m").candidates]
        assert sorted(names) == ["honest", "liar"], pairs


def test_infinite_remaining_reads_as_full_not_as_nan() -> None:
    room = Headroom(Clock())
    room.observe([(b"x-ratelimit-remaining-requests", b"inf")], 200)
    assert room.fraction() == 1.0


def test_a_nan_reset_is_ignored_rather_than_kept_forever() -> None:
    assert parse_duration("nan") is None
    clock = Clock()
    room = Headroom(clock)
    room.observe([(b"x-ratelimit-remaining-requests", b"0"), (b"x-ratelimit-reset-requests", b"nan")], 200)
    clock.now += 61  # Azure's one-minute trust of a figure without a (readable) reset
    assert room.fraction() == 1.0


def test_remaining_above_the_limit_is_full_headroom_not_more() -> None:
    room = Headroom(Clock())
    room.observe([(b"x-ratelimit-remaining-requests", b"500"), (b"x-ratelimit-limit-requests", b"100")], 200)
    assert room.fraction() == 1.0


def test_durations_are_finite_and_within_a_day() -> None:
    for text in ABSURD:
        seconds = parse_duration(text)
        assert seconds is None or (math.isfinite(seconds) and 0 <= seconds <= MAX_RESET_S), text
