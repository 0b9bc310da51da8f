"""CPU time and memory of a process tree, read from /proc (Linux only).

CPU is ``utime + stime`` of every live process in the tree (all threads included),
in clock ticks converted to seconds. A child that exits between two samples takes
its CPU with it, so the benchmark samples servers whose processes live for the whole
run. RSS is ``VmRSS``; the peak is ``VmHWM``, summed over the tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class TreeSample:
    """One reading of a process tree."""

    cpu_s: float
    rss_kb: int
    hwm_kb: int
    processes: int


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        ppid = _ppid(int(entry.name))
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _ppid(pid: int) -> int | None:
    stat = _read(pid, "stat")
    if stat is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return int(stat.rpartition(")")[2].split()[1])


def _read(pid: int, name: str) -> str | None:
    try:
        return (_PROC / str(pid) / name).read_text()
    except OSError:  # the process is gone
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads), in seconds; 0 if it is gone."""
    stat = _read(pid, "stat")
    if stat is None:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    # After the command: state(0) ppid(1) … utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / _TICK


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in KiB; zeros if it is gone."""
    status = _read(pid, "status")
    rss = hwm = 0
    if status is None:
        return rss, hwm
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def sample(pids: list[int]) -> TreeSample:
    """CPU and memory summed over the trees rooted at ``pids``."""
    cpu = 0.0
    rss = hwm = count = 0
    for root in pids:
        for pid in tree(root):
            cpu += cpu_seconds(pid)
            r, h = memory_kb(pid)
            rss += r
            hwm += h
            count += 1
    return TreeSample(cpu, rss, hwm, count)


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy (not idle or waiting on I/O)."""
    fields = [int(x) for x in (_PROC / "stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _TICK


def self_cpu_seconds() -> float:
    """This process's own CPU (user + system), in seconds."""
    t = os.times()
    return t.user + t.system
