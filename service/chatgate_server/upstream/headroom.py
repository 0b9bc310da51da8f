"""How much rate limit a deployment has left, from the headers of its responses.

OpenAI and Azure OpenAI send, on every response, what is left of the per-minute
request and token limits (``x-ratelimit-remaining-requests`` / ``-tokens``, with
``x-ratelimit-limit-*`` and ``x-ratelimit-reset-*`` as durations such as ``6m0s``;
Azure sends the remaining counts). A 429 says how long to stay away
(``retry-after-ms`` / ``retry-after``). The router reads :meth:`Headroom.fraction` to
steer calls away from a deployment *before* it answers 429, and not to send any there
while it cools down after one.

The figures are the upstream's view as of its last response; the attempts chatgate
has running there since are subtracted from the requests left. A figure whose reset
time has passed is forgotten (the window refilled). No figures at all reads as full
headroom: a server that sends none is never steered away from.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable

# A 429 without a retry-after still keeps calls away this long.
DEFAULT_COOL_DOWN_S = 1.0
# Longest cool-down taken from an upstream's hint (a longer one is the breaker's business).
MAX_COOL_DOWN_S = 60.0
# Longest reset we believe (OpenAI's daily windows say "23h…"; a day bounds it).
MAX_RESET_S = 86_400.0

# Header → (which limit, what about it); "retry" for the 429's wait.
_FIELDS: dict[bytes, tuple[str, str]] = {
    f"x-ratelimit-{kind}-{which}".encode(): (which, kind)
    for which in ("requests", "tokens")
    for kind in ("remaining", "limit", "reset")
}
_FIELDS[b"retry-after-ms"] = ("retry", "ms")
_FIELDS[b"retry-after"] = ("retry", "s")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """``6m0s``, ``1.5s``, ``20ms``, ``1h2m`` or plain seconds → seconds; None if unreadable."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        # "nan" would make a reset time no clock ever reaches: a figure kept forever.
        return None if math.isnan(seconds) else min(max(seconds, 0.0), MAX_RESET_S)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return min(sum(float(n) * _UNIT_S[u] for n, u in parts), MAX_RESET_S)


class _Limit:
    """One of the two limits (requests, tokens) as last reported."""

    __slots__ = ("limit", "remaining", "reset_at")

    def __init__(self) -> None:
        self.remaining: float | None = None
        self.limit: float | None = None
        self.reset_at = 0.0

    def fraction(self, now: float, used_since: int) -> float:
        if self.remaining is None or now >= self.reset_at:
            return 1.0
        limit = self.limit if self.limit else max(self.remaining, 1.0)
        # An upstream that says it has more left than its limit has full headroom, not more.
        return min(max(self.remaining - used_since, 0.0) / limit, 1.0)


class Headroom:
    """A deployment's rate-limit headroom, updated from each response's headers."""

    __slots__ = ("_clock", "_requests", "_tokens", "cool_until")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests = _Limit()
        self._tokens = _Limit()
        self.cool_until = 0.0

    def observe(self, headers: Iterable[tuple[bytes, bytes]], status: int) -> None:
        """Take what the response's headers say. One dict lookup per header: this runs
        on every response (httpcore keeps the names' case as sent)."""
        now = self._clock()
        retry_after: float | None = None
        for name, raw in headers:
            field = _FIELDS.get(name.lower())
            if field is None:
                continue
            which, kind = field
            if which == "retry":
                if status == 429 and (kind == "ms" or retry_after is None):
                    seconds = _number(raw)
                    if seconds is not None:
                        retry_after = seconds / 1000.0 if kind == "ms" else seconds
                continue
            limit = self._requests if which == "requests" else self._tokens
            if kind == "remaining":
                limit.remaining = _number(raw)
                if limit.reset_at <= now:
                    # Azure sends no reset time: trust the figure for a minute (its window).
                    limit.reset_at = now + 60.0
            elif kind == "limit":
                limit.limit = _number(raw)
            else:
                seconds = parse_duration(raw.decode("latin-1"))
                if seconds is not None:
                    limit.reset_at = now + seconds
        if status == 429:
            self.cool_down(DEFAULT_COOL_DOWN_S if retry_after is None else retry_after)

    def cool_down(self, seconds: float) -> None:
        """Keep calls away for ``seconds`` (capped), e.g. after a 429."""
        seconds = min(max(seconds, 0.0), MAX_COOL_DOWN_S)
        self.cool_until = max(self.cool_until, self._clock() + seconds)

    @property
    def cooling(self) -> bool:
        return self._clock() < self.cool_until

    def fraction(self, in_flight: int = 0) -> float:
        """Headroom from 0 (none, or cooling down) to 1 (full or unknown)."""
        now = self._clock()
        if now < self.cool_until:
            return 0.0
        return min(self._requests.fraction(now, in_flight), self._tokens.fraction(now, 0))


def _number(raw: bytes) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    # NaN and infinity are lies: inf/inf is NaN, which no headroom comparison accepts
    # (the router would drop the deployment from every plan).
    return value if value >= 0 and math.isfinite(value) else None
