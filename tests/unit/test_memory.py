"""Large buffers go back to the system when freed (issue 13, item 10: RSS stayed high)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh interpreter: after a first large buffer raised glibc's mmap threshold, 40
# buffers of 4 MiB, each followed by a small allocation that stays, are freed; the RSS
# they leave behind is printed in MiB.
PROBE = """
import sys
from chatgate_server.memory import keep_large_allocations_unpooled
if sys.argv[1] == "fixed":
    assert keep_large_allocations_unpooled()
def rss():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS:")) // 1024
warm = [b"y" * (4 << 20) for _ in range(2)]
del warm
base = rss()
blocks = []
for i in range(40):
    blocks.append(b"y" * (4 << 20))
    blocks.append(b"x" * 1000 + bytes([i]))
del blocks[::2]
print(rss() - base)
"""


def retained_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_large_buffers_leave_no_resident_memory() -> None:
    assert retained_mib("unfixed") > 100  # what the allocator keeps by default
    assert retained_mib("fixed") < 10
