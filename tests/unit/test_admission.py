"""Caller-supplied request ids: fingerprints, the admission rules, and which attempt's row stays."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from chatgate_server.domain import (
    Caller,
    ChatMessage,
    CompletionRequest,
    Cost,
    JsonSchemaFormat,
    Outcome,
    SamplingOptions,
    TokenUsage,
    ToolSpec,
    UsageRecord,
)
from chatgate_server.errors import DuplicateRequest
from chatgate_server.usage.admission import RequestIdGuard, fingerprint
from chatgate_server.usage.reservations import Claim
from chatgate_server.usage.store import StoredAttempt, settle_attempts

T0 = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)


def request(**overrides: object) -> CompletionRequest:
    base = CompletionRequest(
        request_id="caller-id-1",
        model="gpt-4o-mini",
        messages=(ChatMessage(role="user", content="Hello"),),
        user_id="u-1",
        tags={"feature": "x"},
        sampling=SamplingOptions(temperature=0.5),
        tools=(ToolSpec("lookup", parameters={"type": "object"}),),
        response_format=JsonSchemaFormat("answer", {"type": "object"}),
        request_id_from_caller=True,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def record(request_id: str = "caller-id-1", *, served: bool, started_at: datetime = T0) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        tenant="default",
        caller_service="svc",
        user_id="u-1",
        requested_model="gpt-4o-mini",
        resolved_model="gpt-4o-mini-2024-07-18" if served else None,
        upstream_response_id=None,
        usage=TokenUsage(),
        cost=Cost(0, "v"),
        outcome=Outcome.COMPLETED if served else Outcome.UPSTREAM_ERROR,
        grpc_status="OK" if served else "UNAVAILABLE",
        finish_reason=None,
        attempts=1,
        time_to_first_token_ms=None,
        duration_ms=1.0,
        started_at=started_at,
    )


# --- fingerprints ---------------------------------------------------------------------------


def test_the_same_request_built_twice_has_the_same_fingerprint() -> None:
    assert fingerprint(request()) == fingerprint(request())
    # Tag order is not content.
    assert fingerprint(request(tags={"a": "1", "b": "2"})) == fingerprint(request(tags={"b": "2", "a": "1"}))
    # The id itself is not content.
    assert fingerprint(request(request_id="other")) == fingerprint(request())


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gpt-4o"},
        {"messages": (ChatMessage(role="user", content="Hello!"),)},
        {"user_id": "u-2"},
        {"caller": Caller(tenant="other", service="svc")},
        {"tags": {"feature": "y"}},
        {"sampling": SamplingOptions(temperature=0.6)},
        {"tools": ()},
        {"response_format": "json_object"},
    ],
)
def test_any_change_of_content_changes_the_fingerprint(change: dict[str, object]) -> None:
    assert fingerprint(request(**change)) != fingerprint(request())


# --- the guard --------------------------------------------------------------------------------


class Reservations:
    """The rules of usage/reservations.py's claim statement, in memory (one row per id)."""

    def __init__(self, stored: Sequence[StoredAttempt] = (), fail: bool = False) -> None:
        self.stored = list(stored)
        self.fail = fail
        self.fail_release = False
        self.calls: list[str] = []
        self.rows: dict[str, tuple[str, bool]] = {}  # id -> (fingerprint, released)
        self.claimed = asyncio.Event()

    async def claim(self, request_id: str, fingerprint: str) -> Claim:
        self.calls.append(request_id)
        self.claimed.set()
        if self.fail:
            raise OSError("postgres is away")
        row = self.rows.get(request_id)
        if row is not None and not (row[1] and row[0] == fingerprint):
            return Claim(False, row[0])
        self.rows[request_id] = (fingerprint, False)
        return Claim(True, stored=self.stored)

    async def release(self, request_id: str, fingerprint: str) -> None:
        if self.fail_release:
            raise OSError("postgres is away")
        if self.rows.get(request_id) == (fingerprint, False):
            self.rows[request_id] = (fingerprint, True)

    async def forget(self, request_id: str, fingerprint: str) -> None:
        if self.rows.get(request_id, ("",))[0] == fingerprint:
            del self.rows[request_id]


def guard(reservations: Reservations) -> RequestIdGuard:
    return RequestIdGuard(reservations, window=timedelta(hours=24), release_delays_s=())


async def test_generated_ids_never_look_anything_up() -> None:
    lookups = Reservations()
    g = guard(lookups)
    generated = request(request_id="0190abc", request_id_from_caller=False)
    await g.admit(generated)
    await g.admit(generated)  # even "the same id twice": generated ids are unique
    assert lookups.calls == []
    assert g.finished(record("0190abc", served=True)).request_fingerprint is None


async def test_a_new_caller_id_is_reserved_once_and_its_record_carries_the_fingerprint() -> None:
    lookups = Reservations()
    g = guard(lookups)
    await g.admit(request())
    assert lookups.calls == ["caller-id-1"]
    assert lookups.rows == {"caller-id-1": (fingerprint(request()), False)}
    finished = g.finished(record(served=True))
    assert finished.request_fingerprint == fingerprint(request())
    await g.close()
    assert lookups.rows == {"caller-id-1": (fingerprint(request()), False)}  # served: kept


async def test_a_retry_after_an_attempt_that_sent_nothing_is_admitted() -> None:
    lookups = Reservations()
    g = guard(lookups)
    await g.admit(request())
    g.finished(record(served=False))  # releases the reservation (in the background)
    await g.admit(request())  # same content: the caller's retry takes the id over
    assert lookups.calls == ["caller-id-1", "caller-id-1"]
    assert lookups.rows == {"caller-id-1": (fingerprint(request()), False)}


async def test_a_retry_whose_release_failed_releases_it_again_first() -> None:
    lookups = Reservations()
    g = guard(lookups)
    await g.admit(request())
    lookups.fail_release = True
    g.finished(record(served=False))
    await asyncio.sleep(0)  # the release runs, and fails
    lookups.fail_release = False
    await g.admit(request())
    assert lookups.rows == {"caller-id-1": (fingerprint(request()), False)}


async def test_reuse_for_different_content_is_refused() -> None:
    g = guard(Reservations())
    await g.admit(request())
    g.finished(record(served=False))
    with pytest.raises(DuplicateRequest, match="different request"):
        await g.admit(request(messages=(ChatMessage(role="user", content="Something else"),)))


async def test_a_served_request_cannot_run_again_under_its_id() -> None:
    g = guard(Reservations())
    await g.admit(request())
    g.finished(record(served=True))
    with pytest.raises(DuplicateRequest, match="already served"):
        await g.admit(request())


async def test_an_id_in_flight_is_refused_even_while_its_lookup_runs() -> None:
    g = guard(Reservations())
    await g.admit(request())
    with pytest.raises(DuplicateRequest, match="in progress"):
        await g.admit(request())


async def test_an_id_reserved_by_another_process_is_refused() -> None:
    # Two guards share one reservation table: two worker processes.
    table = Reservations()
    first, second = guard(table), guard(table)
    await first.admit(request())
    with pytest.raises(DuplicateRequest, match="different request"):
        await second.admit(request(user_id="u-2"))
    with pytest.raises(DuplicateRequest, match="in progress or already served"):
        await second.admit(request())
    # Released by an attempt that sent nothing: the same content may take it over,
    # other content still may not.
    first.finished(record(served=False))
    await first.close()
    with pytest.raises(DuplicateRequest, match="different request"):
        await second.admit(request(user_id="u-2"))
    await second.admit(request())


async def test_a_retry_that_outruns_the_release_on_another_process_is_admitted() -> None:
    table = Reservations()
    first = guard(table)
    second = RequestIdGuard(table, window=timedelta(hours=24), reserve_timeout_s=10, recheck_delay_s=1)
    await first.admit(request())
    table.claimed.clear()
    retry = asyncio.create_task(second.admit(request()))
    await table.claimed.wait()  # the retry's first claim found the id still held
    first.finished(record(served=False))  # the failed attempt's release lands now
    await first.close()
    await retry
    assert table.calls == ["caller-id-1"] * 3


async def test_an_id_known_to_be_held_is_refused_even_if_the_second_look_fails() -> None:
    class FailingSecondLook(Reservations):
        async def claim(self, request_id: str, fingerprint: str) -> Claim:
            if self.calls:
                raise OSError("postgres went away")
            self.calls.append(request_id)
            return Claim(False, fingerprint)

    g = RequestIdGuard(FailingSecondLook(), window=timedelta(hours=24), recheck_delay_s=0)
    with pytest.raises(DuplicateRequest, match="in progress or already served"):
        await g.admit(request())


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ([StoredAttempt(T0, "ff" * 16, served=False)], "different request"),
        ([StoredAttempt(T0, None, served=True)], "different request"),  # a generated id's row
        ([StoredAttempt(T0, fingerprint(request()), served=True)], "already served"),
    ],
)
async def test_rows_in_postgres_decide_when_memory_has_nothing(
    stored: list[StoredAttempt], message: str
) -> None:
    table = Reservations(stored)
    g = guard(table)
    with pytest.raises(DuplicateRequest, match=message):
        await g.admit(request())
    assert table.rows == {}  # the refused call's reservation is dropped
    # A refused call is not left "in flight".
    table.stored = []
    await g.admit(request())


async def test_a_stored_attempt_that_sent_nothing_admits_the_retry() -> None:
    g = guard(Reservations([StoredAttempt(T0, fingerprint(request()), served=False)]))
    await g.admit(request())


async def test_when_postgres_is_away_the_lookup_fails_open_then_backs_off() -> None:
    lookups = Reservations(fail=True)
    now = [100.0]
    g = RequestIdGuard(lookups, window=timedelta(hours=24), clock=lambda: now[0], backoff_s=2.0)
    await g.admit(request(request_id="a"))
    assert g.lookups_skipped == 1
    # Within the back-off the next call does not wait on Postgres at all...
    lookups.fail = False
    await g.admit(request(request_id="b"))
    assert (g.lookups_skipped, len(lookups.calls)) == (2, 1)
    # ...and after it, one call tries again.
    now[0] += 2.0
    await g.admit(request(request_id="c"))
    assert (g.lookups_skipped, len(lookups.calls)) == (2, 2)


async def test_a_reservation_that_hangs_fails_open_quickly() -> None:
    class Hanging(Reservations):
        async def claim(self, request_id: str, fingerprint: str) -> Claim:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    g = RequestIdGuard(Hanging(), window=timedelta(hours=24), reserve_timeout_s=0.01)
    await g.admit(request())
    assert g.lookups_skipped == 1


# --- which attempt's row stays ---------------------------------------------------------------


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_a_served_retry_supersedes_a_stored_attempt_that_sent_nothing() -> None:
    delete, skip = settle_attempts(
        [StoredAttempt(at(0), "f", served=False)], [record(served=True, started_at=at(1))]
    )
    assert delete == [at(0)] and skip == set()


def test_an_attempt_that_sent_nothing_arriving_late_is_dropped() -> None:
    # The spool replays the failed first attempt after the retry's row was written.
    delete, skip = settle_attempts(
        [StoredAttempt(at(1), "f", served=True)], [record(served=False, started_at=at(0))]
    )
    assert delete == [] and skip == {at(0)}


def test_both_attempts_in_one_batch_keep_the_served_one() -> None:
    delete, skip = settle_attempts(
        [], [record(served=False, started_at=at(0)), record(served=True, started_at=at(1))]
    )
    assert delete == [] and skip == {at(0)}


def test_of_attempts_that_all_sent_nothing_the_latest_stays() -> None:
    delete, skip = settle_attempts(
        [StoredAttempt(at(0), "f", served=False)],
        [record(served=False, started_at=at(2)), record(served=False, started_at=at(1))],
    )
    assert delete == [at(0)] and skip == {at(1)}


def test_a_replay_of_a_stored_row_is_skipped_and_two_served_rows_are_both_kept() -> None:
    delete, skip = settle_attempts(
        [StoredAttempt(at(0), "f", served=True)],
        [record(served=True, started_at=at(0)), record(served=True, started_at=at(1))],
    )
    # The replay is skipped; the second served attempt is kept: a bill never loses one.
    assert delete == [] and skip == {at(0)}


def test_the_same_record_twice_in_one_batch_is_not_skipped() -> None:
    # ON CONFLICT keeps one of them; skipping by key here would drop both.
    delete, skip = settle_attempts([], [record(served=True), record(served=True)])
    assert delete == [] and skip == set()


def test_the_fingerprint_names_whom_a_call_bills_not_the_credential_that_proved_it() -> None:
    caller = Caller(tenant="acme", service="billing-api")
    rotated = Caller(
        tenant="acme", service="billing-api", roles=frozenset({"operator"}), credential_id="x" * 16
    )
    assert fingerprint(request(caller=caller)) == fingerprint(request(caller=rotated))
    assert fingerprint(request(caller=caller)) != fingerprint(request(caller=replace(caller, tenant="other")))
    assert fingerprint(request(caller=caller)) != fingerprint(
        request(caller=replace(caller, service="other"))
    )
