"""The retry decision, with numbers: Retry-After, the deadline, jitter bounds."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import pytest

from chatgate_server.deadline import Deadline
from chatgate_server.errors import (
    BreakerOpen,
    RequestTooLarge,
    UpstreamCredentialsError,
    UpstreamError,
    UpstreamMisconfigured,
    UpstreamRateLimited,
    UpstreamRejected,
)
from chatgate_server.upstream.retry import RetryDecision, RetryPolicy, decide, with_retries

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


def test_a_deployments_own_fault_moves_the_call_on_but_never_retries_it_there() -> None:
    misconfigured = UpstreamMisconfigured("wrong api-version", problem="api-version", http_status=400)
    for error in (misconfigured, UpstreamCredentialsError("key", http_status=401)):
        assert decide(error, 1, 100, POLICY, failover=True) == RetryDecision(True, 0.0, "failover")
        assert decide(error, 1, 100, POLICY, failover=False).reason == "not_retryable"
        assert decide(error, POLICY.max_attempts, 100, POLICY, failover=True).reason == "attempts_exhausted"
    # A caller mistake is the same everywhere: never moved.
    assert decide(UpstreamRejected("bad", http_status=400), 1, 100, POLICY, failover=True).retry is False


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


@pytest.mark.parametrize(
    ("error", "attempt", "remaining", "reason"),
    [
        (UpstreamRejected("bad", http_status=400), 1, 100, "not_retryable"),
        (UpstreamError("x"), 4, 100, "attempts_exhausted"),
        (UpstreamRateLimited("x", retry_after=1), 4, 100, "attempts_exhausted"),
        (UpstreamError("x"), 1, 0.25, "deadline"),  # the jittered wait (0.25 s) ends at the deadline
    ],
)
def test_a_stop_says_why_and_waits_nothing(
    error: BaseException, attempt: int, remaining: float, reason: str
) -> None:
    d = decide(error, attempt, remaining_s=remaining, policy=POLICY, rng=lambda: 0.5)
    assert d == RetryDecision(False, 0.0, reason)


def test_the_longest_honoured_retry_after_is_honoured() -> None:
    d = decide(UpstreamRateLimited("x", retry_after=60), 1, remaining_s=100, policy=POLICY, rng=lambda: 0.5)
    assert d == RetryDecision(True, 60, "retry_after")


def test_a_retry_after_that_ends_exactly_at_the_deadline_is_not_honoured() -> None:
    d = decide(UpstreamRateLimited("x", retry_after=5), 1, remaining_s=5, policy=POLICY, rng=lambda: 0.5)
    assert d == RetryDecision(True, 0.25, "backoff")


def _failing(*errors: UpstreamError) -> tuple[list[int], Callable[[], Awaitable[str]]]:
    """An attempt that raises ``errors`` in turn, then succeeds; and its call count."""
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "ok"

    return calls, attempt


async def test_each_attempt_gets_its_own_decision_and_the_wait_is_slept() -> None:
    first, second = UpstreamRateLimited("x", retry_after=0.05), UpstreamRateLimited("x", retry_after=0.1)
    calls, attempt = _failing(first, second)
    seen: list[tuple[int, BaseException, float]] = []
    started = time.monotonic()
    result = await with_retries(
        attempt, POLICY, Deadline.start(None, 60), on_retry=lambda n, e, d: seen.append((n, e, d.wait_s))
    )
    assert result == "ok" and len(calls) == 3
    assert seen == [(1, first, 0.05), (2, second, 0.1)]
    assert time.monotonic() - started >= 0.14  # both waits (0.15 s) were slept; asyncio may wake a hair early


async def test_attempts_run_out_after_max_attempts_and_only_retries_are_reported() -> None:
    calls, attempt = _failing(*(UpstreamError(f"down {n}", http_status=503) for n in range(10)))
    retries: list[int] = []
    policy = RetryPolicy(max_attempts=3, base_s=0.001, cap_s=0.001)
    with pytest.raises(UpstreamError, match="down 2"):
        await with_retries(
            attempt, policy, Deadline.start(None, 60), on_retry=lambda n, e, d: retries.append(n)
        )
    assert len(calls) == 3
    assert retries == [1, 2]


async def test_the_backoff_is_drawn_from_the_given_jitter() -> None:
    _, attempt = _failing(UpstreamError("down", http_status=503))
    waits: list[float] = []
    await with_retries(
        attempt,
        POLICY,
        Deadline.start(None, 60),
        rng=lambda: 0.02,
        on_retry=lambda n, e, d: waits.append(d.wait_s),
    )
    assert waits == [0.01]  # 0.02 of the first ceiling (0.5 s)


async def test_one_log_line_per_retry_and_per_give_up(caplog: pytest.LogCaptureFixture) -> None:
    _, attempt = _failing(
        UpstreamRateLimited("x", retry_after=0.01, http_status=429),
        UpstreamError("connect failed", retry_after=0.01),  # no HTTP status: the error names itself
        UpstreamError("down", http_status=503),
    )
    caplog.set_level(logging.INFO, logger="chatgate_server.upstream.retry")
    with pytest.raises(UpstreamError, match="down"):
        await with_retries(attempt, RetryPolicy(max_attempts=3), Deadline.start(None, 60))
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            logging.INFO,
            "upstream attempt 1 failed: HTTP 429 Too Many Requests (UPSTREAM_RATE_LIMITED); "
            "retrying in 0.010s (retry_after)",
        ),
        (
            logging.INFO,
            "upstream attempt 2 failed: UpstreamError (UPSTREAM_UNAVAILABLE); "
            "retrying in 0.010s (retry_after)",
        ),
        (
            logging.WARNING,
            "upstream attempt 3 failed: HTTP 503 Service Unavailable (UPSTREAM_UNAVAILABLE); "
            "giving up (attempts_exhausted)",
        ),
    ]
    assert caplog.records[-1].fields == {  # type: ignore[attr-defined]
        "attempt": 3,
        "upstream_status": 503,
        "error_reason": "UPSTREAM_UNAVAILABLE",
        "retry": False,
        "retry_wait_s": 0.0,
        "retry_decision": "attempts_exhausted",
    }


async def test_a_failure_that_is_not_retried_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    _, attempt = _failing(UpstreamRejected("bad", http_status=400))
    caplog.set_level(logging.INFO, logger="chatgate_server.upstream.retry")
    with pytest.raises(UpstreamRejected):
        await with_retries(attempt, POLICY, Deadline.start(None, 60))
    assert caplog.records == []


async def test_a_status_outside_the_standard_list_is_logged_by_its_number(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, attempt = _failing(UpstreamError("odd", http_status=599, retry_after=0.0123456))
    caplog.set_level(logging.INFO, logger="chatgate_server.upstream.retry")
    await with_retries(attempt, POLICY, Deadline.start(None, 60))
    assert [r.getMessage() for r in caplog.records] == [
        "upstream attempt 1 failed: HTTP 599 (UPSTREAM_UNAVAILABLE); retrying in 0.012s (retry_after)"
    ]
    assert caplog.records[0].fields["retry_wait_s"] == 0.012  # type: ignore[attr-defined]
