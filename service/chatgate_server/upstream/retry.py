"""When and how long to wait before another upstream attempt.

Retries happen only before the first event has gone to the caller (the completion
service guarantees that by retrying only the open-and-first-event step). The
schedule, per failed attempt:

- not retryable (the error says so: caller mistakes, our credentials, billing,
  request too large, ``x-should-retry: false``) → stop; except that a deployment's
  own trouble (its key, its billing, its configuration) moves the call to another
  deployment if any;
- attempts used up → stop (failovers to another deployment count as attempts: one
  budget bounds retries and failovers together);
- the next attempt goes to another deployment (``router.py``) → go at once: that
  deployment has not just failed;
- the upstream asked for a wait (``retry-after-ms`` / ``retry-after``) that fits in the
  time left → wait exactly that;
- otherwise exponential backoff with full jitter: uniform(0, min(cap, base·2^(n−1)));
- a wait that would end at or past the deadline is not slept → stop now.

tenacity runs the loop; :class:`RetrySchedule` supplies its ``stop`` and ``wait``.
Whether to stop depends on the wait (does it fit in the deadline?), so both come from
one decision per failed attempt, made by whichever tenacity asks first.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from chatgate_server.deadline import Deadline
from chatgate_server.errors import ChatgateError, UpstreamError

T = TypeVar("T")

log = logging.getLogger(__name__)

# Stops worth a line: the call gave up on retrying. Not-retryable failures are not
# about retrying (the access line tells their end).
_LOGGED_STOPS = frozenset({"attempts_exhausted", "deadline"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How persistent to be. Defaults follow the OpenAI SDK's calibration."""

    max_attempts: int = 3
    """Attempts in all, the first included."""
    base_s: float = 0.5
    """First backoff ceiling; doubles per attempt."""
    cap_s: float = 8.0
    """Largest backoff ceiling."""
    max_retry_after_s: float = 60.0
    """Longest upstream-requested wait we honour (longer ones are treated as backoff)."""

    def backoff_ceiling(self, failed_attempts: int) -> float:
        return float(min(self.cap_s, self.base_s * 2 ** (failed_attempts - 1)))


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a failed attempt: wait ``wait_s`` then retry, or stop."""

    retry: bool
    wait_s: float
    reason: str  # "retry_after", "backoff", or why we stop


def decide(
    error: BaseException,
    failed_attempts: int,
    remaining_s: float,
    policy: RetryPolicy,
    rng: Callable[[], float] = random.random,
    *,
    failover: bool = False,
) -> RetryDecision:
    """The pure decision, separated from tenacity so it can be tested with numbers.
    ``failover``: the next attempt would go to another deployment."""
    if not isinstance(error, UpstreamError):
        return RetryDecision(False, 0.0, "not_retryable")
    moves_on = failover and (error.retryable or error.deployment_fault)
    if not error.retryable and not moves_on:
        return RetryDecision(False, 0.0, "not_retryable")
    if failed_attempts >= policy.max_attempts:
        return RetryDecision(False, 0.0, "attempts_exhausted")
    if moves_on:
        return RetryDecision(True, 0.0, "failover")
    asked = error.retry_after
    if asked is not None and asked <= policy.max_retry_after_s and asked < remaining_s:
        return RetryDecision(True, asked, "retry_after")
    wait = rng() * policy.backoff_ceiling(failed_attempts)
    if wait >= remaining_s:
        return RetryDecision(False, 0.0, "deadline")
    return RetryDecision(True, wait, "backoff")


RetryListener = Callable[[int, BaseException, RetryDecision], None]


class RetrySchedule:
    """tenacity ``stop``/``wait`` for one call, bound to its deadline."""

    def __init__(
        self,
        policy: RetryPolicy,
        deadline: Deadline,
        *,
        rng: Callable[[], float] = random.random,
        on_retry: RetryListener | None = None,
        failover: Callable[[], bool] | None = None,
    ) -> None:
        self._failover = failover
        self._policy = policy
        self._deadline = deadline
        self._rng = rng
        self._on_retry = on_retry
        self._decided_attempt = 0
        self.last_decision: RetryDecision | None = None

    def _decision(self, state: RetryCallState) -> RetryDecision | None:
        error = state.outcome.exception() if state.outcome else None
        if error is None:
            return None
        if self._decided_attempt != state.attempt_number or self.last_decision is None:
            self._decided_attempt = state.attempt_number
            self.last_decision = decide(
                error,
                state.attempt_number,
                self._deadline.remaining(),
                self._policy,
                self._rng,
                failover=self._failover is not None and self._failover(),
            )
            _log_decision(state.attempt_number, error, self.last_decision)
            if self.last_decision.retry and self._on_retry is not None:
                self._on_retry(state.attempt_number, error, self.last_decision)
        return self.last_decision

    def stop(self, state: RetryCallState) -> bool:
        decision = self._decision(state)
        return decision is None or not decision.retry

    def wait(self, state: RetryCallState) -> float:
        decision = self._decision(state)
        return decision.wait_s if decision is not None else 0.0


def _log_decision(attempt: int, error: BaseException, decision: RetryDecision) -> None:
    """One line per retry (and per give-up) with what the upstream answered; the log
    filter adds the call's request id."""
    if not decision.retry and decision.reason not in _LOGGED_STOPS:
        return
    status = error.http_status if isinstance(error, UpstreamError) else None
    phrase = _status_phrase(status)
    reason = error.reason if isinstance(error, ChatgateError) else type(error).__name__
    what = f"HTTP {status}{phrase}" if status is not None else type(error).__name__
    then = f"retrying in {decision.wait_s:.3f}s" if decision.retry else "giving up"
    log.log(
        logging.INFO if decision.retry else logging.WARNING,
        "upstream attempt %d failed: %s (%s); %s (%s)",
        attempt,
        what,
        reason,
        then,
        decision.reason,
        extra={
            "fields": {
                "attempt": attempt,
                "upstream_status": status,
                "error_reason": reason,
                "retry": decision.retry,
                "retry_wait_s": round(decision.wait_s, 3),
                "retry_decision": decision.reason,
            }
        },
    )


def _status_phrase(status: int | None) -> str:
    try:
        return f" {HTTPStatus(status).phrase}" if status is not None else ""
    except ValueError:
        return ""  # a status outside the standard list: the number says it all


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    deadline: Deadline,
    *,
    rng: Callable[[], float] = random.random,
    on_retry: RetryListener | None = None,
    failover: Callable[[], bool] | None = None,
) -> T:
    """Run ``attempt`` until it succeeds or the schedule says stop; re-raise the last error.

    ``failover`` says whether the next attempt would go to another deployment."""
    # Most calls succeed at once: try before building tenacity's machinery (about
    # 46 µs per call), and replay a retryable first failure into it so the schedule,
    # attempt numbers and on_retry calls are exactly as if tenacity had run it.
    first: UpstreamError | None
    try:
        return await attempt()
    except UpstreamError as exc:
        first = exc
    schedule = RetrySchedule(policy, deadline, rng=rng, on_retry=on_retry, failover=failover)
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(UpstreamError),
        stop=schedule.stop,
        wait=schedule.wait,
        reraise=True,
    )
    async for try_ in retrying:
        with try_:
            if first is not None:
                error, first = first, None
                raise error
            return await attempt()
    raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover
