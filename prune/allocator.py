"""A steady CPU allocator for timing: glibc's malloc thresholds fixed for this process.

glibc returns the free top of its heap to the system once it exceeds a trim threshold, and serves
blocks above an mmap threshold with fresh mappings; both thresholds move with the process's own
allocation history (the "dynamic mmap threshold", mallopt(3)). A forward pass frees and allocates
the same activation buffers every call, so in some processes each pass gets its pages back from
the kernel and pays their faults again, in others it reuses them: the demo teacher (4 s, one
thread, thread clock) ran 14-15 ms in some processes and 20-24 ms in others, alike for every
copy of the model in the process and for every input, while a cut model ran 8-9 ms in both, so
one cut/unpruned ratio read 0.37 in one process and 0.57 in another. Fixing both thresholds
(``mallopt(M_TRIM_THRESHOLD)``, ``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic
adjustment off) keeps the pages, from then on, in every process: the teacher then ran 13-15 ms in
every one of five processes (docs/performance.md, section 7). That is the latency of the model's
work, what a server that keeps its memory (or runs jemalloc / tcmalloc, PyTorch's CPU tuning
guide's advice) sees, rather than of the allocator's history.

The price: this process no longer returns freed memory to the system (its resident size stays at
its peak) and serves big blocks from the heap. ``steady`` is called by every timing
(``prune.measured.interleaved``), so only processes that time models pay it. Elsewhere than glibc
(macOS, musl) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

# mallopt(3) parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRIM_BYTES = 1 << 30  # above any activation a pass frees
MMAP_BYTES = 1 << 30  # glibc before 2.26 caps this at 32 MiB (HEAP_MAX_SIZE / 2): then that cap
LEGACY_MMAP_BYTES = 32 << 20

_state: Optional[str] = None


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc


def steady() -> str:
    """Fix glibc's trim and mmap thresholds for this process (once; see the module docstring) and
    say what the allocator is now: "glibc 2.36, trim/mmap thresholds 1024/1024 MiB", or why it was
    left alone."""
    global _state
    if _state is None:
        libc = _glibc()
        if libc is None:
            _state = "not glibc: left as it is"
        else:
            version = libc.gnu_get_libc_version().decode()
            trim = libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1
            mmap = MMAP_BYTES if libc.mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) == 1 else (
                LEGACY_MMAP_BYTES if libc.mallopt(M_MMAP_THRESHOLD, LEGACY_MMAP_BYTES) == 1 else None)
            if not trim or mmap is None:
                _state = f"glibc {version}: mallopt refused (trim {trim}, mmap {mmap}); dynamic thresholds"
            else:
                _state = f"glibc {version}, trim/mmap thresholds {TRIM_BYTES >> 20}/{mmap >> 20} MiB"
    return _state


def state() -> Optional[str]:
    """What ``steady`` did in this process, None if it has not run."""
    return _state
