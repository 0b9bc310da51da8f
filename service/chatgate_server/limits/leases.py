"""One process's lease on a shared pool: a budget's window (tokens or spend per UTC day
or month) or a concurrency limit.

The pool in Postgres (``limit_pools``, migration 0010) gives out its amount once per
window. This process holds a slice of it (``held``) and admits calls against the slice
alone: a call reserves what it may cost, settlement replaces the reservation with what
it cost. What was spent is reported at the next sync; what is not needed is given back.
Pure arithmetic here, with an injected clock; the engine (engine.py) runs the syncs.

Why the total cannot overshoot (docs/LIMITS.md has the proof): the pool never grants
beyond its amount, and a process admits only against what it was granted — except for
the part of a settlement beyond its reservation (input tokens counted after the fact),
which is reported as spent and so reduces what anybody is granted next.

Concurrency uses the same pool with a window that never ends: a stream reserves one
slot and spends nothing, so settlement gives the slot back to the local slice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolSync:
    """What to send in one ``limit_pool_sync`` call."""

    spent: int
    back: int
    want: int


@dataclass(frozen=True, slots=True)
class PoolGrant:
    """What ``limit_pool_sync`` answered."""

    held: int
    granted: int
    remaining: int


class PoolAccount:
    """This process's view of one pool: what it holds, reserved and spent since the
    last sync, and how fast it has been spending (to size the next slice)."""

    def __init__(self, amount: int, *, ttl_s: float, now: float, reusable: bool = False) -> None:
        self.amount = amount
        self.ttl_s = ttl_s
        self.reusable = reusable
        """Concurrency: what a call reserved comes back when it ends."""
        self.held = 0
        self.spent = 0
        self.reserved = 0
        self.remaining = amount
        """The pool's ungranted amount at the last sync (others may hold more)."""
        self.lease_until = now
        self.used_in_window = 0
        """What this process admitted in the window, for the share while Postgres is away."""
        self.last_take = now
        self._demand = 0
        self._demand_since = now
        self.rate = 0.0
        """Recent demand per second, measured between syncs."""
        self.last_need = 1
        self.returning = 0
        """Given back by a sync under way: not to be spent meanwhile."""
        self.pending = 0
        """What calls waiting for the next sync need."""

    # --- the hot path -------------------------------------------------------------

    def available(self, now: float) -> int:
        """What may still be admitted against the lease (negative: spent beyond it)."""
        held = self.held if now < self.lease_until else 0
        return held - self.spent - self.reserved - self.returning

    def take(self, n: int, now: float, *, share: int | None = None) -> bool:
        """Reserve ``n`` if the lease covers it — or, while Postgres is away (``share``
        given), if this process's share of the window does."""
        self.last_need = n if n > 1 else 1
        # available(now), inlined: this runs for every limit of every call.
        held = self.held if now < self.lease_until else 0
        short = held - self.spent - self.reserved - self.returning < n
        if short and (share is None or self.used_in_window + n > share):
            return False
        self.reserved += n
        self.used_in_window += n
        self.last_take = now
        self._demand += n
        return True

    def settle(self, reserved: int, actual: int) -> None:
        """A call that reserved ``reserved`` ended having used ``actual``."""
        self.reserved -= reserved
        if self.reusable:
            self.used_in_window -= reserved
            return
        self.spent += actual
        self.used_in_window += actual - reserved

    def cancel(self, reserved: int) -> None:
        """A reservation taken for a call that was then refused by another limit."""
        self.reserved -= reserved
        self.used_in_window -= reserved

    # --- syncs ---------------------------------------------------------------------

    def plan(self, now: float, *, live: int, horizon_s: float, idle_s: float) -> PoolSync:
        """The next sync: report what was spent, keep ``reserved`` plus a slice of about
        ``horizon_s`` of demand (never more than remaining / (2 × live) beyond one call's
        need, so slices shrink as the pool nears its end), give back the rest."""
        elapsed = max(now - self._demand_since, 1e-3)
        self.rate = self._demand / elapsed if self._demand else self.rate * 0.5
        self._demand, self._demand_since = 0, now
        idle = now - self.last_take >= idle_s and not self.pending
        # What calls need now (those waiting, or at least one more), plus a speculative
        # part for the demand to come that shrinks as the pool empties.
        speculative = 0 if idle else min(int(self.rate * horizon_s), self.remaining // (2 * max(live, 1)))
        slice_ = 0 if idle else max(self.pending, self.last_need) + speculative
        if self.reusable:
            spent, left = 0, self._lease_now(now)
        else:
            spent, left = self.spent, self._lease_now(now) - self.spent
        target = self.reserved + slice_
        if left < target:
            return PoolSync(spent, 0, target - max(left, 0))
        back = max(left - target - slice_, 0) if slice_ else max(left - self.reserved, 0)
        self.returning += back
        return PoolSync(spent, back, 0)

    def applied(self, sync: PoolSync, grant: PoolGrant, started: float) -> None:
        """The sync ``sync`` sent at ``started`` was answered with ``grant``."""
        self.spent -= sync.spent
        self.returning -= sync.back
        self.held = grant.held
        self.remaining = grant.remaining
        # Measured from before the request left: the database's own expiry is later.
        self.lease_until = started + self.ttl_s

    def failed(self, sync: PoolSync) -> None:
        """The sync did not reach the database — or its answer was lost after the
        database gave ``back`` to the pool: assume it did (never hold too much)."""
        self.returning -= sync.back
        self.held -= sync.back

    def worth_syncing(self, now: float, *, idle_s: float) -> bool:
        """Whether the background loop should sync now: running low, lease half gone,
        spending to report, or idle with something to give back."""
        lease = self.held if now < self.lease_until else 0  # _lease_now, inlined (a take asks)
        spent, reserved = self.spent, self.reserved
        if lease == 0 and spent == 0 and reserved == 0:
            return False
        busy = now - self.last_take < idle_s
        if busy and (lease - spent - reserved - self.returning) * 2 < self.last_need + int(self.rate):
            return True
        if now >= self.lease_until - self.ttl_s / 2:
            return True
        return not busy and (lease - spent - reserved > 0 or spent > 0)

    def idle(self, now: float, idle_s: float) -> bool:
        """Nothing held, spent or reserved, and no demand: the account can be dropped."""
        return self.held == 0 and self.spent == 0 and self.reserved == 0 and now - self.last_take >= idle_s

    def _lease_now(self, now: float) -> int:
        return self.held if now < self.lease_until else 0

    def estimate_remaining(self, now: float) -> int:
        """About what the limit still allows: the pool's ungranted part plus this
        process's unused slice (slices others hold are not counted: never too much)."""
        return max(0, self.remaining + max(self.available(now), 0))
