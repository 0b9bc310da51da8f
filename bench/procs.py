"""Starting and stopping the benchmark's processes, each pinned to its core.

The layout follows the issue: the server under test (chatgate or a baseline) on one
core, the load generator and the upstream on the other, so the server's figures are
not disturbed by its own load. ``taskset`` (util-linux) does the pinning; without it,
or on one core, nothing is pinned and the report says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which cores the server and the load side get (None: not pinned)."""

    server: str | None
    load: str | None
    note: str

    def prefix(self, cores: str | None) -> list[str]:
        return ["taskset", "-c", cores] if cores is not None else []


def plan_pinning(enabled: bool) -> Pinning:
    cores = sorted(os.sched_getaffinity(0))
    if not enabled:
        return Pinning(None, None, "pinning disabled (--no-pin)")
    if shutil.which("taskset") is None:
        return Pinning(None, None, "taskset not found: nothing pinned")
    if len(cores) < 2:
        return Pinning(None, None, f"only {len(cores)} core available: nothing pinned")
    server, load = str(cores[0]), ",".join(str(c) for c in cores[1:])
    return Pinning(server, load, f"server on core {server}; load generator and upstream on core(s) {load}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class Proc:
    """A child process started by the suite; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    name: str
    popen: subprocess.Popen[str]
    first_line: str = ""
    log: Path | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def child_env(extra: Mapping[str, str] | None = None, pythonpath: str | None = None) -> dict[str, str]:
    """The environment of every child: the repo importable (``bench``), optionally another chatgate first."""
    env = dict(os.environ)
    paths = [p for p in (pythonpath, str(ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def start(
    name: str,
    args: Sequence[str],
    *,
    cores: str | None,
    pinning: Pinning,
    env: Mapping[str, str],
    log_dir: Path,
    wait_for_line: bool = True,
    timeout: float = 30.0,
) -> Proc:
    """Start ``python args…``; with ``wait_for_line``, return once it printed its first line."""
    log = log_dir / f"{name}.log"
    cmd = [*pinning.prefix(cores), sys.executable, *args]
    popen = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.PIPE if wait_for_line else subprocess.DEVNULL,
        stderr=log.open("w"),
        text=True,
    )
    proc = Proc(name, popen, log=log)
    if wait_for_line:
        assert popen.stdout is not None
        deadline = time.monotonic() + timeout
        line = popen.stdout.readline().strip()
        if not line or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"{name} did not start; see {log}:\n{_tail(log)}")
        proc.first_line = line
    return proc


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return ""
