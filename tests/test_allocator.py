"""prune.allocator: every timing runs under fixed glibc malloc thresholds, so a pass's freed pages
stay with the process instead of being faulted back in on the next pass (the cause of the demo
teacher's 14 ms vs 22 ms from one process to the next)."""

import subprocess
import sys
import textwrap

import pytest

from prune import allocator
from prune.measured import interleaved

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="not glibc: prune.allocator leaves malloc alone")

# a fresh process: malloc and free 256 MiB, touched, and report how much of it the process still holds
FREED_PAGES = textwrap.dedent("""
    import ctypes, os, sys
    from prune import allocator
    if sys.argv[1] == "steady":
        allocator.steady()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    size = 256 << 20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    before = rss()
    libc.free(ctypes.c_void_p(block))
    print((rss() - before + size) / size)
""")


def kept_after_free(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FREED_PAGES, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@glibc
def test_steady_keeps_a_freed_block_in_the_process_where_glibc_would_give_it_back():
    assert kept_after_free("default") < 0.1  # glibc unmaps a 256 MiB block on free (above its mmap threshold)
    assert kept_after_free("steady") > 0.9  # from the heap, not trimmed: the next pass finds its pages


@glibc
def test_steady_says_what_it_set_once_and_every_timing_sets_it():
    interleaved({"noop": lambda: None}, repeats=1)
    state = allocator.state()
    assert state is not None and state.startswith("glibc ") and "trim/mmap thresholds 1024/" in state
    assert allocator.steady() == state  # once per process


def test_a_profiled_table_records_the_allocator(tmp_path):
    from prune.latency_profile import profile
    from prune.models import preset_config

    table = profile(preset_config("hubert_base_tiny"), seconds=0.1, repeats=1, conv_points=1, ffn_points=1,
                    head_points=1)
    assert table["allocator"] == allocator.steady()
