"""The loop's recent lag: the largest lateness seen, halved every half-life, replaced by
a larger one — what the final event's margin adds to (deadline.py)."""

from __future__ import annotations

import pytest

from chatgate_server.loop_lag import LoopLag


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_largest_lateness_is_kept_and_forgotten_by_halves() -> None:
    clock = Clock()
    lag = LoopLag(half_life_s=5.0, clock=clock)
    assert lag.recent() == 0.0
    lag.observe(0.3)
    assert lag.recent() == pytest.approx(0.3)
    clock.now += 5.0
    assert lag.recent() == pytest.approx(0.15)
    lag.observe(0.1)  # smaller than what is remembered: kept as it was
    assert lag.recent() == pytest.approx(0.15)
    lag.observe(0.2)
    clock.now += 10.0
    assert lag.recent() == pytest.approx(0.05)
