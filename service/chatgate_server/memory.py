"""Give the memory of large requests back to the system when they are done.

glibc serves allocations over a threshold (128 KiB at first) with their own mmap and
returns them on free — but each such free raises the threshold (up to 32 MiB), so after
one burst of multi-megabyte requests later ones come from the heap, whose freed pages
the process keeps. Fixing the threshold keeps large buffers (request bytes, prompt
strings, upstream bodies) in their own mappings: measured with bench/request_memory.py,
40 concurrent 3.9 MB requests left one process at 664 MB RSS three seconds later, and at
267 MB with this. Allocations under 128 KiB (the streaming path's) are not affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE_ALLOCATION = 128 * 1024


def keep_large_allocations_unpooled() -> bool:
    """Fix glibc's mmap threshold at 128 KiB; False where there is no glibc (a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION))
    except (OSError, AttributeError):  # musl has no mallopt
        return False
