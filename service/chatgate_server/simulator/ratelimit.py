"""The per-instance rate-limit budget: what ``x-ratelimit-*`` headers report, and when a
request is refused with 429.

Two buckets, requests and tokens, each holding up to its limit and refilling
continuously from empty to full over ``window_s`` seconds (OpenAI's limits are per
minute, so 60 s by default). Each served request spends one request and its token
cost; a request the buckets cannot pay for is refused and spends nothing. The reset
headers say how long until a bucket is full again, in OpenAI's duration format.

A test scripts the budget (``Simulator.set_headroom`` or ``POST /_simulator/ratelimit``):
a small limit with a long window makes an instance's headroom fall request by request
while another instance with the defaults stays high. The defaults are far above what
any benchmark sends, so an unscripted simulator never refuses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

DEFAULT_LIMIT_REQUESTS = 1_000_000
DEFAULT_LIMIT_TOKENS = 1_000_000_000
DEFAULT_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Headroom:
    """What the budget holds now: limits, what remains, and ms until each bucket is full."""

    limit_requests: int
    remaining_requests: int
    reset_requests_ms: int
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_ms: int
    window_s: float


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not served: which bucket, and when asking again can succeed.

    ``too_large``: the request costs more tokens than the limit; it can never be served.
    """

    kind: Literal["requests", "tokens"]
    limit: int
    used: int
    requested: int
    retry_after_ms: int
    too_large: bool = False


class RateBudget:
    """Two continuously refilling buckets; ``clock`` is injectable for tests."""

    def __init__(
        self,
        *,
        limit_requests: int = DEFAULT_LIMIT_REQUESTS,
        limit_tokens: int = DEFAULT_LIMIT_TOKENS,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._limit_requests = 0
        self._limit_tokens = 0
        self._window_s = DEFAULT_WINDOW_S
        self._requests = 0.0
        self._tokens = 0.0
        self._at = clock()
        self.set(
            limit_requests=limit_requests,
            limit_tokens=limit_tokens,
            window_s=window_s,
            remaining_requests=limit_requests,
            remaining_tokens=limit_tokens,
        )

    def set(
        self,
        *,
        limit_requests: int | None = None,
        limit_tokens: int | None = None,
        remaining_requests: int | None = None,
        remaining_tokens: int | None = None,
        window_s: float | None = None,
    ) -> Headroom:
        """Change limits, what remains now, or the refill window. Raises ValueError.

        A lowered limit also lowers what remains to at most the new limit."""
        self._refill()
        if limit_requests is not None:
            self._limit_requests = _positive("limit_requests", limit_requests)
        if limit_tokens is not None:
            self._limit_tokens = _positive("limit_tokens", limit_tokens)
        if window_s is not None:
            if not (isinstance(window_s, int | float) and math.isfinite(window_s) and window_s > 0):
                raise ValueError("window_s must be a positive number of seconds")
            self._window_s = float(window_s)
        if remaining_requests is not None:
            self._requests = float(_within("remaining_requests", remaining_requests, self._limit_requests))
        if remaining_tokens is not None:
            self._tokens = float(_within("remaining_tokens", remaining_tokens, self._limit_tokens))
        self._requests = min(self._requests, self._limit_requests)
        self._tokens = min(self._tokens, self._limit_tokens)
        return self.headroom()

    def headroom(self) -> Headroom:
        """The budget now."""
        self._refill()
        return Headroom(
            limit_requests=self._limit_requests,
            remaining_requests=int(self._requests),
            reset_requests_ms=self._until(self._limit_requests, self._requests, self._limit_requests),
            limit_tokens=self._limit_tokens,
            remaining_tokens=int(self._tokens),
            reset_tokens_ms=self._until(self._limit_tokens, self._tokens, self._limit_tokens),
            window_s=self._window_s,
        )

    def spend(self, tokens: int) -> Refusal | None:
        """Pay for one request of ``tokens`` tokens, or say why it cannot be paid for."""
        self._refill()
        if tokens > self._limit_tokens:
            used = self._limit_tokens - int(self._tokens)
            return Refusal("tokens", self._limit_tokens, used, tokens, 0, too_large=True)
        if self._requests < 1:
            used = self._limit_requests - int(self._requests)
            wait = self._until(1, self._requests, self._limit_requests)
            return Refusal("requests", self._limit_requests, used, 1, wait)
        if self._tokens < tokens:
            used = self._limit_tokens - int(self._tokens)
            return Refusal(
                "tokens",
                self._limit_tokens,
                used,
                tokens,
                self._until(tokens, self._tokens, self._limit_tokens),
            )
        self._requests -= 1
        self._tokens -= tokens
        return None

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._at)
        self._at = now
        if elapsed:
            share = elapsed / self._window_s
            self._requests = min(float(self._limit_requests), self._requests + share * self._limit_requests)
            self._tokens = min(float(self._limit_tokens), self._tokens + share * self._limit_tokens)

    def _until(self, level: float, current: float, limit: int) -> int:
        """Milliseconds until the bucket (refilling ``limit`` per window) holds ``level``."""
        missing = level - current
        if missing <= 0:
            return 0
        return math.ceil(missing / limit * self._window_s * 1000)


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer")
    return value


def _within(name: str, value: int, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ValueError(f"{name} must be an integer from 0 to the limit ({limit})")
    return value


def go_duration(ms: int) -> str:
    """OpenAI's reset format (Go's duration style): ``0s``, ``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{minutes}m{seconds}"
    return seconds


def openai_headers(headroom: Headroom) -> list[tuple[str, str]]:
    """The six headers api.openai.com sends on every response."""
    return [
        ("x-ratelimit-limit-requests", str(headroom.limit_requests)),
        ("x-ratelimit-limit-tokens", str(headroom.limit_tokens)),
        ("x-ratelimit-remaining-requests", str(headroom.remaining_requests)),
        ("x-ratelimit-remaining-tokens", str(headroom.remaining_tokens)),
        ("x-ratelimit-reset-requests", go_duration(headroom.reset_requests_ms)),
        ("x-ratelimit-reset-tokens", go_duration(headroom.reset_tokens_ms)),
    ]


def azure_headers(headroom: Headroom) -> list[tuple[str, str]]:
    """The two Azure OpenAI sends: what remains, without limits or resets."""
    return [
        ("x-ratelimit-remaining-requests", str(headroom.remaining_requests)),
        ("x-ratelimit-remaining-tokens", str(headroom.remaining_tokens)),
    ]
