"""One process's slice of a shared token bucket: requests or tokens per minute.

A rate limit of N per minute is a bucket of capacity N refilled at N/60 per second
(``limit_buckets``, migration 0010): it allows a burst of N, then N/60 per second,
and — unlike a fixed window — never 2N around a minute's boundary. This process takes
a slice of whole tokens out of the shared bucket with one statement and admits calls
against it; a call's settlement puts back what it reserved and did not use (or owes
what it used beyond: a negative slice is paid from the next take); unused tokens go
back to the bucket when demand stops. Pure arithmetic here; the engine runs the takes.

While Postgres is away, the process refills a bucket of its own at its share of the
rate (capacity and rate ÷ live processes), so the rate stays near the limit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BucketTake:
    """What to send in one ``limit_bucket_take`` call."""

    want: int
    back: float


class BucketAccount:
    """This process's slice of one bucket, and its demand."""

    def __init__(self, amount: int, *, now: float) -> None:
        self.amount = amount
        self.held = 0.0
        """Tokens taken from the shared bucket and not yet spent (negative: owed)."""
        self.level = float(amount)
        """The shared bucket's level after the last take (others may have taken since)."""
        self.level_at = now
        self.last_take = now
        self.last_need = 1
        self.pending = 0
        """What calls waiting for the next take need."""
        self._demand = 0
        self._demand_since = now
        self.rate = 0.0
        self._local = 0.0
        self._local_at: float | None = None

    @property
    def capacity(self) -> float:
        return float(self.amount)

    @property
    def per_s(self) -> float:
        return self.amount / 60.0

    # --- the hot path -------------------------------------------------------------

    def take(self, n: int, now: float, *, live: int | None = None) -> bool:
        """Take ``n`` from the slice — or, while Postgres is away (``live`` given), from
        this process's own bucket of 1/live of the capacity and rate."""
        self.last_need = n if n > 1 else 1
        if self.held >= n:
            self.held -= n
        elif live is not None and self._local_take(n, now, live):
            pass
        else:
            return False
        self.last_take = now
        self._demand += n
        return True

    def _local_take(self, n: int, now: float, live: int) -> bool:
        share = self.capacity / max(live, 1)
        if self._local_at is None:
            # Empty, not full, on going away: a Postgres slow enough to time a statement
            # out makes processes flap between away and back, and a full burst on each
            # flap let three processes admit 130 calls of a 72-call minute. Empty, the
            # local bucket only ever adds its share of the rate.
            self._local, self._local_at = 0.0, now
        self._local = min(share, self._local + (now - self._local_at) * self.per_s / max(live, 1))
        self._local_at = now
        if self._local < n:
            return False
        self._local -= n
        return True

    def settle(self, reserved: int, actual: int) -> None:
        self.held += reserved - actual

    def cancel(self, reserved: int) -> None:
        self.held += reserved

    def reconnected(self) -> None:
        """Postgres answered again: the local bucket is done with."""
        self._local_at = None

    # --- takes ----------------------------------------------------------------------

    def plan(self, now: float, *, live: int, horizon_s: float, idle_s: float) -> BucketTake:
        """Top the slice up to about ``horizon_s`` of demand (never beyond the bucket's
        level / (2 × live) above one call's need), or give it all back when idle. A
        negative slice (a debt from settlements) goes to the bucket either way. What
        goes back leaves the slice now, so calls admitted meanwhile cannot spend it."""
        elapsed = max(now - self._demand_since, 1e-3)
        self.rate = self._demand / elapsed if self._demand else self.rate * 0.5
        self._demand, self._demand_since = 0, now
        if now - self.last_take >= idle_s and not self.pending:
            take = BucketTake(0, self.held)
        else:
            speculative = min(int(self.rate * horizon_s), int(self.level_now(now) // (2 * max(live, 1))))
            slice_ = max(self.pending, self.last_need) + max(speculative, 0)
            if self.held < 0:
                take = BucketTake(slice_, self.held)
            elif self.held < slice_:
                take = BucketTake(slice_ - int(self.held), 0.0)
            else:
                take = BucketTake(0, max(self.held - 2 * slice_, 0.0))
        self.held -= take.back
        return take

    def applied(self, take: BucketTake, granted: int, level: float, now: float) -> None:
        self.held += granted
        self.level, self.level_at = level, now

    def failed(self, take: BucketTake) -> None:
        """The take's answer did not come: a debt stays owed here; tokens given back are
        assumed gone (the database may have taken them: never hold too much)."""
        if take.back < 0:
            self.held += take.back

    def worth_syncing(self, now: float, *, idle_s: float) -> bool:
        if now - self.last_take >= idle_s:
            return self.held != 0
        return self.held * 2 < self.last_need + self.rate

    def idle(self, now: float, idle_s: float) -> bool:
        return self.held == 0 and now - self.last_take >= idle_s

    def level_now(self, now: float) -> float:
        """The shared level, refilled since it was last seen."""
        return min(self.capacity, self.level + (now - self.level_at) * self.per_s)

    def estimate_remaining(self, now: float) -> int:
        return max(0, int(self.level_now(now) + max(self.held, 0)))

    def retry_after(self, n: int, now: float) -> float | None:
        """When ``n`` would fit in the shared bucket at the refill rate; None if never."""
        if n > self.capacity or self.per_s <= 0:
            return None
        missing = n - self.level_now(now) - max(self.held, 0)
        return max(missing / self.per_s, 0.05)
