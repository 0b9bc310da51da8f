"""Absurd durations on the operator commands (``block --for``, ``callers create
--expires``, ``anomalies policy --block-for``): a usage error (exit 2, one line),
never a traceback and never a block that is over before it starts."""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import timedelta

import pytest

from chatgate_server.auth.commands import MAX_DURATION, duration
from chatgate_server.limits.blocks_commands import block_duration

ABSURD = ["0s", "-1h", "1.5h", "", "h", "99999999999w", "1000000000d", "100000d", "9" * 400 + "m", "\u0661h"]


@pytest.mark.parametrize("text", ABSURD)
def test_absurd_durations_are_argument_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_the_longest_duration_is_a_century_and_zero_is_allowed_where_it_means_now() -> None:
    assert duration(f"{MAX_DURATION.days}d") == MAX_DURATION
    assert duration("0m") == timedelta(0)  # rotate --grace 0m: the old token stops at once


def test_a_block_for_no_time_at_all_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="at least"):
        block_duration("0m")
    assert block_duration("30m") == timedelta(minutes=30)


@pytest.mark.parametrize(
    "argv",
    [
        ["block", "user", "acme/u-1", "--for", "99999999999w", "--reason", "x"],
        ["block", "user", "acme/u-1", "--for", "0m", "--reason", "x"],
        ["callers", "create", "--tenant", "acme", "--name", "n", "--expires", "1000000000d"],
    ],
)
def test_the_commands_say_one_usage_line(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "chatgate_server", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and "error: argument" in done.stderr.splitlines()[-1], done.stderr


@pytest.mark.parametrize("text", ["99999999999d", "1000000000d", "99999999999999999999w"])
def test_a_since_before_the_calendar_is_a_value_error(text: str) -> None:
    from datetime import UTC, datetime

    from chatgate_server.usage.commands import parse_when

    with pytest.raises(ValueError, match="before the calendar"):
        parse_when(text, datetime.now(UTC))


def test_detector_policy_durations_must_last() -> None:
    from chatgate_server.auth.commands import positive_duration

    with pytest.raises(argparse.ArgumentTypeError):
        positive_duration("0m")
