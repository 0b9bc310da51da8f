"""The shared life of the in-memory tables: a bounded first load, then a poll that keeps
the last good copy through an outage and says so once."""

from __future__ import annotations

import asyncio
import logging

import pytest

from chatgate_server.table_poll import TablePoller


class Source:
    """A table's refresh that fails for the listed calls (1-based) and counts the rest."""

    def __init__(self, failing: set[int], hang_first: bool = False) -> None:
        self.failing = failing
        self.hang_first = hang_first
        self.calls = 0
        self.loads = 0
        self.enough = asyncio.Event()

    async def refresh(self) -> None:
        self.calls += 1
        if self.calls >= 8:
            self.enough.set()
        if self.calls == 1 and self.hang_first:
            await asyncio.Event().wait()
        if self.calls in self.failing:
            raise ConnectionError("postgres is away")
        self.loads += 1


async def test_a_failed_first_load_is_logged_and_the_poll_loads_it_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    source = Source(failing={1})
    poller = TablePoller(source.refresh, what="test table", unloaded="nothing applies", poll_s=0.001)
    await poller.start(1.0)
    await source.enough.wait()
    await poller.stop()
    assert source.loads >= 7  # every later poll loaded
    assert [r.getMessage() for r in caplog.records] == [
        "cannot load the test table (ConnectionError); nothing applies"
    ]


async def test_an_outage_is_logged_once_and_again_after_a_recovery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    source = Source(failing={2, 3, 4, 6})
    poller = TablePoller(source.refresh, what="test table", unloaded="", poll_s=0.001)
    await poller.start(1.0)
    await source.enough.wait()
    await poller.stop()
    assert [r.getMessage() for r in caplog.records] == [
        "cannot refresh the test table: ConnectionError",  # polls 2-4: one outage, one line
        "cannot refresh the test table: ConnectionError",  # poll 6: a new outage
    ]


async def test_a_first_load_that_hangs_is_cut_at_its_bound_and_polling_goes_on() -> None:
    source = Source(failing=set(), hang_first=True)
    poller = TablePoller(source.refresh, what="test table", unloaded="", poll_s=0.001)
    await poller.start(0.01)
    await source.enough.wait()
    await poller.stop()
    assert source.loads >= 7


async def test_stop_ends_the_poll() -> None:
    source = Source(failing=set())
    poller = TablePoller(source.refresh, what="test table", unloaded="", poll_s=0.001)
    await poller.start(1.0)
    await poller.stop()
    calls = source.calls
    await asyncio.sleep(0.02)
    assert source.calls == calls
