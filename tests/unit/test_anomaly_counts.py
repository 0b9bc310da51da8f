"""Counting calls refused at the edge: which count, per minute, bounded, and kept when
Postgres cannot take them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from chatgate_server.domain import Caller
from chatgate_server.limits.anomaly_counts import Key, RefusalCounter, RefusalFlusher

ACME = Caller(tenant="acme", service="billing")
T0 = datetime(2026, 11, 15, 12, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.now = T0 + 5

    def __call__(self) -> float:
        return self.now


def test_invalid_calls_count_per_minute_and_reason() -> None:
    clock = Clock()
    counter = RefusalCounter(clock=clock)
    for _ in range(3):
        counter(ACME, "INVALID_ARGUMENT", "INVALID_REQUEST")
    counter(ACME, "ALREADY_EXISTS", "DUPLICATE_REQUEST_ID")
    clock.now = T0 + 65
    counter(ACME, "INVALID_ARGUMENT", "INVALID_REQUEST")
    minute = datetime.fromtimestamp(T0, UTC)
    next_minute = datetime.fromtimestamp(T0 + 60, UTC)
    assert counter.take() == {
        (minute, "acme", "billing", "INVALID_REQUEST"): 3,
        (minute, "acme", "billing", "DUPLICATE_REQUEST_ID"): 1,
        (next_minute, "acme", "billing", "INVALID_REQUEST"): 1,
    }
    assert counter.take() == {}


def test_overload_shutdown_and_blocks_do_not_count() -> None:
    counter = RefusalCounter()
    counter(ACME, "RESOURCE_EXHAUSTED", "CONCURRENCY_LIMIT")  # this replica's limit, not the caller
    counter(ACME, "UNAVAILABLE", "SHUTTING_DOWN")
    counter(ACME, "PERMISSION_DENIED", "BLOCKED")
    assert counter.take() == {}


def test_keys_are_bounded_while_counts_wait() -> None:
    counter = RefusalCounter(max_keys=2)
    for service in ("a", "b", "c"):
        counter(Caller("acme", service), "INVALID_ARGUMENT", "INVALID_REQUEST")
    counter(Caller("acme", "a"), "INVALID_ARGUMENT", "INVALID_REQUEST")
    counts = counter.take()
    assert sorted((k[2], n) for k, n in counts.items()) == [("a", 2), ("b", 1)]


async def test_counts_a_failed_write_could_not_take_are_written_next_time() -> None:
    counter = RefusalCounter()
    written: list[dict[Key, int]] = []
    fail = True

    async def write(counts: Mapping[Key, int]) -> None:
        if fail:
            raise OSError("postgres away")
        written.append(dict(counts))

    flusher = RefusalFlusher(counter, write)
    counter(ACME, "INVALID_ARGUMENT", "INVALID_REQUEST")
    await flusher.flush()
    assert written == []
    counter(ACME, "INVALID_ARGUMENT", "INVALID_REQUEST")
    fail = False
    await flusher.flush()
    assert [sum(c.values()) for c in written] == [2]
    await flusher.flush()  # nothing new: nothing written
    assert len(written) == 1
