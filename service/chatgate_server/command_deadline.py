"""A bound on the whole of a one-shot command (``chatgate limits``, ``usage``, …).

Connecting is bounded already (``connect_timeout``, the pool's open timeout), but a
database that accepts the connection and then does not answer — a statement queued
behind a lock that a migration or a stuck transaction holds, a network that drops
packets mid-query, a pooler with no server free — would hold the command forever, and
with it a script or an operator's shell. Statement timeouts cannot cover all of these
(a network that went silent never delivers the error), and TCP keepalives not a peer
that keeps the socket alive, so the bound is the process's own: a real-time timer
that, when it fires, prints one line and ends the process. Nothing is left half-done:
each command's changes are one transaction, which Postgres rolls back when the
connection goes.

Written by hand because it is a few lines over :mod:`signal`; it runs only in the
one-shot command processes, never in ``serve``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from chatgate_server.config import float_setting

ENV = "CHATGATE_COMMAND_TIMEOUT_SECONDS"
DEFAULT_S = 120.0
EXIT_CODE = 1


def command_timeout_from_env() -> float | None:
    """The bound in seconds (None: no bound, when set to 0). ConfigError if malformed."""
    return float_setting(os.environ, ENV, DEFAULT_S, minimum=0, maximum=86_400) or None


@contextlib.contextmanager
def bounded(command: str) -> Iterator[None]:
    """End this process with one line if ``command`` is still running after the bound.

    The timer is disarmed when the block ends, so ``main()`` called in-process leaves
    nothing behind. The command runs unbounded off the main thread (signals cannot be
    handled there) and when a timer is armed already: whoever armed it (a test
    harness's per-test timeout) owns SIGALRM and bounds the command itself."""
    seconds = command_timeout_from_env()
    if (
        seconds is None
        or threading.current_thread() is not threading.main_thread()
        or signal.getitimer(signal.ITIMER_REAL)[0] > 0
    ):
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        print(
            f"chatgate: {command}: gave up after {seconds:g}s: the database did not answer"
            f" (a lock held elsewhere, or the network; raise {ENV} for long reports)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_CODE)  # no cleanup to wait for: the open transaction rolls back

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
