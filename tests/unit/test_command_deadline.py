"""The bound on a one-shot command: it ends a command that outlives it with one line,
and leaves nothing armed behind when ``main()`` runs in-process. The checks of what is
armed run in a fresh interpreter: pytest-timeout keeps a SIGALRM timer of its own here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from chatgate_server.command_deadline import ENV, bounded


def python(code: str, timeout_s: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, ENV: timeout_s}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)


def test_a_command_that_outlives_the_bound_ends_with_one_line() -> None:
    ran = python("import time\nfrom chatgate_server.command_deadline import bounded\n"
                 "with bounded('usage'):\n    time.sleep(60)", "0.5")  # fmt: skip
    assert ran.returncode == 1
    assert ran.stderr.splitlines() == [
        f"chatgate: usage: gave up after 0.5s: the database did not answer"
        f" (a lock held elsewhere, or the network; raise {ENV} for long reports)"
    ]


ARMED = """
import signal, threading
from chatgate_server.command_deadline import bounded
handler = signal.getsignal(signal.SIGALRM)
with bounded("limits"):
    during = signal.getitimer(signal.ITIMER_REAL)[0]
after = signal.getitimer(signal.ITIMER_REAL)
seen = []
def off_main():
    with bounded("limits"):
        seen.append(signal.getitimer(signal.ITIMER_REAL)[0])
thread = threading.Thread(target=off_main)
thread.start()
thread.join()
print(during, after == (0.0, 0.0), signal.getsignal(signal.SIGALRM) is handler, seen)
"""


def test_in_process_it_leaves_no_timer_and_no_handler_behind() -> None:
    during, disarmed, restored, off_main = python(ARMED, "30").stdout.split(maxsplit=3)
    assert 29 < float(during) <= 30
    assert (disarmed, restored) == ("True", "True")
    assert off_main.strip() == "[0.0]"  # another thread: no signals there, so no bound
    during, *_ = python(ARMED, "0").stdout.split()
    assert float(during) == 0.0  # 0: no bound


def test_a_timer_armed_already_is_left_to_its_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "30")
    handler = signal.getsignal(signal.SIGALRM)
    signal.setitimer(signal.ITIMER_REAL, 500)  # as a harness's per-test timeout does
    try:
        with bounded("limits"):
            assert signal.getitimer(signal.ITIMER_REAL)[0] > 400
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 400
        assert signal.getsignal(signal.SIGALRM) is handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
