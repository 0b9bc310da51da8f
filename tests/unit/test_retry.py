"""The retry decision, with numbers: Retry-After, the deadline, jitter bounds."""

from __future__ import annotations

import pytest

from chatgate_server.deadline import Deadline
from chatgate_server.errors import (
    BreakerOpen,
    RequestTooLarge,
    UpstreamCredentialsError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
)
from chatgate_server.upstream.retry import RetryPolicy, decide, with_retries

POLICY = RetryPolicy(max_attempts=4, base_s=0.5, cap_s=8.0, max_retry_after_s=60.0)


def test_retry_after_is_honoured_when_it_fits() -> None:
    d = decide(UpstreamRateLimited("x", retry_after=2.5), 1, remaining_s=10, policy=POLICY, rng=lambda: 0.9)
    assert (d.retry, d.wait_s, d.reason) == (True, 2.5, "retry_after")


def test_retry_after_past_the_deadline_falls_back_to_backoff() -> None:
    d = decide(UpstreamRateLimited("x", retry_after=20), 1, remaining_s=5, policy=POLICY, rng=lambda: 0.5)
    assert (d.retry, d.wait_s, d.reason) == (True, 0.25, "backoff")


def test_a_wait_that_would_end_past_the_deadline_is_not_slept() -> None:
    d = decide(UpstreamError("x"), 3, remaining_s=0.5, policy=POLICY, rng=lambda: 0.99)
    assert (d.retry, d.reason) == (False, "deadline")


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 6])
def test_full_jitter_stays_within_the_exponential_ceiling(attempt: int) -> None:
    policy = RetryPolicy(max_attempts=10, base_s=0.5, cap_s=8.0)
    ceiling = min(8.0, 0.5 * 2 ** (attempt - 1))
    low = decide(UpstreamError("x"), attempt, 100, policy, rng=lambda: 0.0)
    high = decide(UpstreamError("x"), attempt, 100, policy, rng=lambda: 0.999999)
    assert low.wait_s == 0.0
    assert ceiling * 0.99 < high.wait_s < ceiling


def test_attempts_are_capped() -> None:
    assert decide(UpstreamError("x"), 4, 100, POLICY).reason == "attempts_exhausted"
    assert decide(UpstreamError("x"), 3, 100, POLICY).retry


@pytest.mark.parametrize(
    "error",
    [
        UpstreamRejected("bad request", http_status=400),
        UpstreamCredentialsError("key", http_status=401),
        RequestTooLarge("too large"),
        BreakerOpen("open", retry_after=3),
        UpstreamError("x-should-retry: false", retryable=False),
        ValueError("not ours"),
    ],
)
def test_never_retried(error: BaseException) -> None:
    assert decide(error, 1, 100, POLICY).retry is False


async def test_with_retries_sleeps_what_was_decided_and_returns_the_success() -> None:
    now = [0.0]
    deadline = Deadline.start(None, 60, clock=lambda: now[0])
    calls: list[int] = []
    waits: list[float] = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise UpstreamRateLimited("slow down", retry_after=0.01)
        return "ok"

    result = await with_retries(attempt, POLICY, deadline, on_retry=lambda n, err, d: waits.append(d.wait_s))
    assert result == "ok"
    assert len(calls) == 3
    assert waits == [0.01, 0.01]


async def test_with_retries_reraises_the_last_error() -> None:
    deadline = Deadline.start(None, 60)

    async def attempt() -> str:
        raise UpstreamRejected("bad", http_status=400)

    with pytest.raises(UpstreamRejected):
        await with_retries(attempt, POLICY, deadline)
