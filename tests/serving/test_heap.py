"""A tier keeps glibc's mmap threshold fixed, so a large block freed after the first batches goes
back to the OS at once instead of staying in a fragmenting heap. Checked in a fresh process with
the C allocator itself: free a 16 MiB block (glibc would raise its threshold above that), then
allocate, touch and free 8 MiB beneath a small block that pins the heap's top."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from speccascade.serving.heap import _MALLOPT, pin_mmap_threshold

PROBE = textwrap.dedent("""
    import ctypes, os, sys
    from speccascade.serving.heap import pin_mmap_threshold
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    if sys.argv[1] == "pinned":
        assert pin_mmap_threshold()
    libc.free(libc.malloc(16 << 20))          # unpinned glibc now serves blocks below ~16 MiB from the heap
    block = libc.malloc(8 << 20)
    guard = libc.malloc(1024)                 # above the block: the heap's top cannot shrink past it
    ctypes.memset(block, 1, 8 << 20)
    before = rss()
    libc.free(block)
    print(before - rss())
""")


def freed_bytes(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.skipif(_MALLOPT is None, reason="not glibc: no mallopt")
def test_a_large_block_freed_after_warm_up_returns_to_the_os_only_with_the_threshold_pinned():
    assert pin_mmap_threshold()
    assert freed_bytes("pinned") >= 7 << 20
    assert freed_bytes("default") < 1 << 20  # what the tiers saw before: the freed block stays resident
