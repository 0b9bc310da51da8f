"""A process's lease on a shared pool: what it may admit, what it reports and gives back."""

from __future__ import annotations

from chatgate_server.limits.leases import PoolAccount, PoolGrant, PoolSync


def granted(account: PoolAccount, held: int, remaining: int, *, at: float = 0.0) -> None:
    """Apply a sync that left the account holding ``held``."""
    sync = account.plan(at, live=1, horizon_s=2.0, idle_s=2.0)
    account.applied(sync, PoolGrant(held, max(held - account.held, 0), remaining), at)


def test_a_new_account_holds_nothing_and_admits_nothing() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    assert account.available(0.0) == 0
    assert not account.take(1, 0.0)


def test_takes_are_admitted_against_the_lease_alone() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 30, 70)
    assert account.take(20, 1.0)
    assert account.take(10, 1.0)
    assert not account.take(1, 1.0)
    assert account.available(1.0) == 0


def test_settlement_replaces_the_reservation_with_what_was_used() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 50, 50)
    account.take(40, 1.0)
    account.settle(40, 15)
    assert account.available(1.0) == 35
    assert account.spent == 15 and account.reserved == 0


def test_overspend_beyond_the_reservation_is_owed() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 10, 90)
    account.take(10, 1.0)
    account.settle(10, 14)
    assert account.available(1.0) == -4
    sync = account.plan(1.5, live=1, horizon_s=2.0, idle_s=2.0)
    assert sync.spent == 14 and sync.want >= 1  # reports all of it, asks for a new slice


def test_an_expired_lease_admits_nothing() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 50, 50)
    assert account.take(1, 9.9)
    assert not account.take(1, 10.0)


def test_a_cancelled_reservation_comes_back() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 5, 95)
    account.take(5, 1.0)
    account.cancel(5)
    assert account.available(1.0) == 5 and account.used_in_window == 0


def test_concurrency_slots_return_when_the_call_ends() -> None:
    account = PoolAccount(2, ttl_s=10, now=0.0, reusable=True)
    granted(account, 2, 0)
    assert account.take(1, 1.0) and account.take(1, 1.0)
    assert not account.take(1, 1.0)
    account.settle(1, 0)
    assert account.take(1, 1.0)
    assert account.spent == 0


def test_waiting_calls_are_asked_for_in_full() -> None:
    account = PoolAccount(1000, ttl_s=10, now=0.0)
    account.pending = 500
    sync = account.plan(0.0, live=1, horizon_s=2.0, idle_s=2.0)
    assert sync.want >= 500


def test_the_speculative_slice_shrinks_as_the_pool_empties() -> None:
    account = PoolAccount(10_000, ttl_s=10, now=0.0)
    granted(account, 10, 40)
    for _ in range(100):  # 1000 per second of demand
        account.take(1, 0.1)
        account.settle(1, 1)
    account.last_need = 1
    sync = account.plan(1.0, live=2, horizon_s=2.0, idle_s=2.0)
    # at most one call's need + remaining / (2 × live processes) beyond what it holds
    assert sync.want <= 1 + 40 // 4 + account.spent


def test_idle_accounts_give_everything_back_and_report_spending() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 50, 50)
    account.take(10, 1.0)
    account.settle(10, 7)
    sync = account.plan(5.0, live=1, horizon_s=2.0, idle_s=2.0)
    assert sync == PoolSync(spent=7, back=43, want=0)
    assert account.available(5.0) == 0  # what goes back cannot be spent meanwhile
    account.applied(sync, PoolGrant(0, 0, 93), 5.0)
    assert account.idle(10.0, 2.0)


def test_a_lost_answer_never_leaves_the_account_holding_too_much() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 50, 50)
    sync = account.plan(5.0, live=1, horizon_s=2.0, idle_s=2.0)
    account.failed(sync)
    assert account.available(5.0) == 0


def test_share_while_postgres_is_away() -> None:
    account = PoolAccount(90, ttl_s=10, now=0.0)
    assert account.take(30, 1.0, share=30)
    assert not account.take(1, 1.0, share=30)


def test_worth_syncing_when_low_and_busy_not_when_empty_and_idle() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    assert not account.worth_syncing(0.0, idle_s=2.0)
    granted(account, 2, 98)
    account.take(2, 0.5)
    assert account.worth_syncing(0.5, idle_s=2.0)
    account.settle(2, 2)
    account.applied(PoolSync(2, 0, 0), PoolGrant(0, 0, 98), 0.6)
    assert not account.worth_syncing(5.0, idle_s=2.0)


def busy(account: PoolAccount, calls: int, until: float) -> None:
    """``calls`` calls of one each, spread over (0, until], each settled at one."""
    for i in range(calls):
        t = until * (i + 1) / calls
        assert account.take(1, t)
        account.settle(1, 1)


def test_a_sync_reports_spending_and_tops_up_to_the_demand_of_the_horizon() -> None:
    account = PoolAccount(10_000, ttl_s=10, now=0.0)
    granted(account, 100, 9900)
    busy(account, 50, 1.0)  # 50 per second
    sync = account.plan(1.0, live=1, horizon_s=2.0, idle_s=2.0)
    # slice = one call + 2 s × 50/s = 101; 50 of the lease left: ask for 51 more
    assert sync == PoolSync(spent=50, back=0, want=51)
    assert account.rate == 50


def test_demand_decays_when_calls_stop() -> None:
    account = PoolAccount(10_000, ttl_s=10, now=0.0)
    granted(account, 100, 9900)
    busy(account, 50, 1.0)
    account.plan(1.0, live=1, horizon_s=2.0, idle_s=5.0)
    account.plan(1.5, live=1, horizon_s=2.0, idle_s=5.0)
    assert account.rate == 25


def test_near_the_end_slices_shrink_to_a_share_of_what_remains() -> None:
    for live, back in ((1, 8), (3, 36)):
        account = PoolAccount(10_000, ttl_s=10, now=0.0)
        granted(account, 100, 40)
        busy(account, 50, 1.0)
        sync = account.plan(1.0, live=live, horizon_s=2.0, idle_s=2.0)
        # slice = 1 + min(100, 40 // (2 × live)); 50 left; keep two slices, give back the rest
        assert sync == PoolSync(spent=50, back=back, want=0), live
        assert account.available(1.0) == 50 - back


def test_idle_means_unused_for_idle_s_or_longer() -> None:
    def used_once() -> PoolAccount:
        account = PoolAccount(100, ttl_s=10, now=0.0)
        granted(account, 30, 70)
        account.take(1, 1.0)
        account.settle(1, 1)
        return account

    # Still in use: keeps two slices of one call, gives back the rest of the 29 left.
    assert used_once().plan(2.9, live=1, horizon_s=2.0, idle_s=2.0) == PoolSync(spent=1, back=27, want=0)
    # Idle: gives back all of it.
    assert used_once().plan(3.0, live=1, horizon_s=2.0, idle_s=2.0) == PoolSync(spent=1, back=29, want=0)


def test_what_goes_back_is_settled_by_the_answer_or_by_its_loss() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 30, 70)
    sync = account.plan(5.0, live=1, horizon_s=2.0, idle_s=2.0)
    assert (sync.back, account.returning) == (30, 30)
    account.applied(sync, PoolGrant(0, 0, 100), 5.0)
    assert (account.returning, account.held, account.remaining) == (0, 0, 100)
    other = PoolAccount(100, ttl_s=10, now=0.0)
    granted(other, 30, 70)
    lost = other.plan(5.0, live=1, horizon_s=2.0, idle_s=2.0)
    other.failed(lost)
    assert (other.returning, other.held) == (0, 0)


def test_use_in_the_window_counts_settled_use_for_the_share() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    assert account.take(10, 0.0, share=10)
    account.settle(10, 4)
    assert account.used_in_window == 4 and account.spent == 4
    assert account.take(6, 0.0, share=10)
    assert not account.take(1, 0.0, share=10)
    account.cancel(6)
    assert account.used_in_window == 4
    slots = PoolAccount(3, ttl_s=10, now=0.0, reusable=True)
    assert slots.take(1, 0.0, share=1)
    assert not slots.take(1, 0.0, share=1)
    slots.settle(1, 0)
    assert slots.used_in_window == 0 and slots.take(1, 0.0, share=1)


def test_leases_are_renewed_from_half_their_life() -> None:
    account = PoolAccount(1000, ttl_s=10, now=0.0)
    granted(account, 500, 500)
    account.take(1, 4.0)
    assert not account.worth_syncing(4.9, idle_s=2.0)
    assert account.worth_syncing(5.0, idle_s=2.0)


def test_slots_in_use_under_an_expired_lease_are_worth_a_sync() -> None:
    slots = PoolAccount(3, ttl_s=10, now=0.0, reusable=True)
    granted(slots, 3, 0)
    slots.take(1, 1.0)
    assert slots.worth_syncing(12.0, idle_s=100.0)


def test_only_an_empty_account_is_idle() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    assert account.idle(2.0, 2.0) and not account.idle(1.9, 2.0)
    granted(account, 10, 90)
    assert not account.idle(100.0, 2.0)
    assert account.estimate_remaining(1.0) == 100


# --- decisions pinned by mutation testing (docs/TESTING.md) --------------------------


def test_the_first_sync_asks_for_what_waiting_calls_need_and_no_more() -> None:
    account = PoolAccount(1000, ttl_s=10, now=100.0)
    assert account.amount == 1000  # the engine's share while away, and the pool's size
    account.pending = 500
    assert account.plan(100.0, live=1, horizon_s=2.0, idle_s=2.0) == PoolSync(0, 0, 500)


def test_demand_is_measured_from_the_last_sync() -> None:
    account = PoolAccount(10_000, ttl_s=10, now=100.0)
    granted(account, 100, 9900, at=100.0)
    busy_from(account, 100.0, 50, 1.0)
    account.plan(101.0, live=1, horizon_s=2.0, idle_s=2.0)
    assert account.rate == 50


def busy_from(account: PoolAccount, start: float, calls: int, seconds: float) -> None:
    for i in range(calls):
        assert account.take(1, start + seconds * (i + 1) / calls)
        account.settle(1, 1)


def test_holding_two_slices_or_less_gives_nothing_back() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 2, 98)  # one call's need is 1 and no demand is measured: keep 2
    assert account.plan(1.0, live=1, horizon_s=2.0, idle_s=2.0) == PoolSync(0, 0, 0)


def test_idle_with_a_long_call_in_flight_gives_back_only_what_is_unreserved() -> None:
    account = PoolAccount(100, ttl_s=100, now=0.0)
    granted(account, 30, 70)
    assert account.take(10, 1.0)
    assert account.plan(5.0, live=1, horizon_s=2.0, idle_s=2.0) == PoolSync(0, 20, 0)
    other = PoolAccount(100, ttl_s=100, now=0.0)
    granted(other, 10, 90)
    assert other.take(10, 1.0)
    assert other.plan(5.0, live=1, horizon_s=2.0, idle_s=2.0) == PoolSync(0, 0, 0)


def test_an_expired_lease_holds_nothing_to_give_back() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 30, 70)
    account.last_take, account.pending = 12.0, 5  # still in use, calls waiting after expiry
    sync = account.plan(12.0, live=1, horizon_s=2.0, idle_s=2.0)
    assert sync.back == 0 and sync.want >= 5  # Postgres reclaimed the 30: ask afresh


def test_low_water_mark_is_half_of_one_call_and_a_second_of_demand() -> None:
    def account(available: int, rate: float) -> PoolAccount:
        a = PoolAccount(1000, ttl_s=100, now=50.0)
        granted(a, available, 1000 - available, at=50.0)
        a.rate, a.last_need, a.last_take = rate, 1, 50.0
        return a

    # low: 2 × available < one call's need + a second of demand
    assert account(5, 10.0).worth_syncing(50.5, idle_s=2.0)  # 10 < 11
    assert not account(6, 10.0).worth_syncing(50.5, idle_s=2.0)  # 12 is not < 11
    assert not account(5, 9.0).worth_syncing(50.5, idle_s=2.0)  # 10 is not < 10


def test_idle_is_worth_a_sync_only_with_something_to_give_back_or_report() -> None:
    def idle(held: int, reserved: int = 0, spent: int = 0) -> bool:
        a = PoolAccount(1000, ttl_s=100, now=50.0)
        granted(a, held, 1000 - held, at=50.0)
        a.last_take, a.reserved, a.spent = 50.0, reserved, spent
        return a.worth_syncing(52.0, idle_s=2.0)  # exactly idle_s later

    assert idle(10)  # 10 unused to give back
    assert idle(1)  # even one
    assert idle(1, spent=1)  # one spent to report
    assert not idle(2, reserved=2)  # all of it in use by a long call: nothing to say


def test_idle_is_measured_from_the_last_take() -> None:
    account = PoolAccount(100, ttl_s=10, now=100.0)
    assert not account.idle(101.9, 2.0) and account.idle(102.0, 2.0)


def test_a_lease_ends_at_its_expiry_exactly() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 30, 70)
    account.last_take, account.pending = 10.0, 1
    assert account.plan(10.0, live=1, horizon_s=2.0, idle_s=2.0).back == 0


def test_estimate_remaining_of_an_empty_pool_is_zero() -> None:
    account = PoolAccount(100, ttl_s=10, now=0.0)
    granted(account, 10, 0)
    assert account.take(10, 1.0)
    assert account.estimate_remaining(1.0) == 0
    account.cancel(10)
    assert account.estimate_remaining(1.0) == 10
