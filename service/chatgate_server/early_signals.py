"""SIGUSR1 (``chatgate prestop``) and SIGHUP (reload) noted from the first line of ``main``.

Both signals' default action ends a process, and ``serve`` installs its own handlers
only once its event loop runs, a second or so of imports later. A preStop hook that
fires while a pod starts, or a SIGHUP sent to reload while a worker starts, would kill
the server in that window; under a supervisor, the forwarded signal killed a starting
worker, and with it every other. :func:`note` records them until serve takes over and
applies them once serving (health NOT_SERVING; one reload). A supervisor starts its
workers with both blocked (:func:`blocked_in_child`), so one forwarded before a worker
reaches :func:`note` stays pending until then.
"""

from __future__ import annotations

import signal
from types import FrameType

_EARLY = frozenset({signal.SIGUSR1, signal.SIGHUP})
_noted: set[int] = set()


def note() -> None:
    """Record SIGUSR1 and SIGHUP from now on, and take any left pending by a supervisor."""
    for signum in _EARLY:
        signal.signal(signum, _record)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _EARLY)


def prestop_noted() -> bool:
    """Whether SIGUSR1 arrived since :func:`note`."""
    return signal.SIGUSR1 in _noted


def reload_noted() -> bool:
    """Whether SIGHUP arrived since :func:`note`."""
    return signal.SIGHUP in _noted


def blocked_in_child() -> None:
    """For a worker's ``preexec_fn``: the mask survives exec; :func:`note` lifts it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _EARLY)


def _record(signum: int, frame: FrameType | None) -> None:
    _noted.add(signum)
