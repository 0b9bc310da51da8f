"""The loop-lag monitor: a loop blocked for a while shows up as lag, and in the log once."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from chatgate_server.loop_lag import LoopLagMonitor


async def test_a_blocked_loop_is_recorded_as_lag_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    recorded: list[float] = []
    monitor = LoopLagMonitor(recorded.append, interval_s=0.02, warn_above_s=0.1, warn_every_s=60)
    monitor.start()
    try:
        await asyncio.sleep(0.1)
        assert recorded  # sampled while idle too
        with caplog.at_level(logging.WARNING, logger="chatgate_server.loop_lag"):
            for _ in range(2):
                time.sleep(0.3)  # noqa: ASYNC251 - blocking on purpose: a saturated worker's loop
                await asyncio.sleep(0.05)
    finally:
        await monitor.stop()
    assert max(recorded) >= 0.25
    assert monitor.max_lag_s == max(recorded)
    warnings = [r for r in caplog.records if "saturated" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: not one line per late timer


async def test_stop_ends_the_monitor() -> None:
    recorded: list[float] = []
    monitor = LoopLagMonitor(recorded.append, interval_s=0.01)
    monitor.start()
    await asyncio.sleep(0.05)
    await monitor.stop()
    seen = len(recorded)
    await asyncio.sleep(0.05)
    assert len(recorded) == seen
