"""Keep freed memory in the process for reuse (glibc only; a no-op elsewhere).

A population update allocates and frees the same tensors of a few hundred kilobytes to a
few megabytes every time. glibc's malloc serves blocks above its mmap threshold
(128 KiB at start) with fresh ``mmap`` calls and gives them back on ``free``, and trims
the heap top when it is free, so every update paid about a hundred page faults and the
matching unmaps: 5-15% of an update of 64 members here, more when the machine is busy.
Fixed, larger thresholds keep those blocks in the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 256 * 1024 * 1024
_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True if it did.

    Blocks up to 32 MiB then come from the heap and stay there when freed, and up to
    256 MiB of free heap is kept before it is returned to the system.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    _done = ok
    return ok
