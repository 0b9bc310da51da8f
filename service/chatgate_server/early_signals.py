"""SIGUSR1 (``chatgate prestop``) noted from the first line of ``main``.

SIGUSR1's default action ends a process, and ``serve`` installs its own handler only
once its event loop runs, a second or so of imports later. A preStop hook that fires
while a pod starts would kill the server in that window; under a supervisor, the
forwarded signal killed a starting worker, and with it every other. :func:`note`
records the signal until serve takes over and applies it (health NOT_SERVING once
serving). A supervisor starts its workers with SIGUSR1 blocked (:func:`blocked_in_child`),
so one forwarded before a worker reaches :func:`note` stays pending until then.
"""

from __future__ import annotations

import signal
from types import FrameType

_noted: list[int] = []


def note() -> None:
    """Record SIGUSR1 from now on, and take one left pending by a supervisor."""
    signal.signal(signal.SIGUSR1, _record)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


def prestop_noted() -> bool:
    """Whether SIGUSR1 arrived since :func:`note`."""
    return bool(_noted)


def blocked_in_child() -> None:
    """For a worker's ``preexec_fn``: the mask survives exec; :func:`note` lifts it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})


def _record(signum: int, frame: FrameType | None) -> None:
    _noted.append(signum)
