"""Keeping a tier replica's resident memory flat over a long run: glibc's heap, not a leak, is what
creeps (see `pin_mmap_threshold` and `trim_heap`; measured in BENCHMARKS.md, soak)."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource


def _load_glibc(name: str):
    """A glibc function by name, or None (another C library)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_glibc("malloc_trim")
_MALLOPT = _load_glibc("mallopt")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial threshold, kept fixed


def pin_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at 128 KiB for the life of the process. glibc raises the
    threshold (up to 32 MiB) each time a large mmapped block is freed, so after the first batches a
    tier's logits, padded caches and attention buffers are carved from the heap instead of mapped,
    and the heap fragments around the long-lived ones: resident memory crept up by about 1 % per 10
    minutes in a 25-minute soak. Pinned, every large tensor is mapped and unmapped whole (the same
    soak: +0.86 % instead of +1.05 % per 10 min for the expert, 0.1 GiB lower; BENCHMARKS.md, soak).
    True if set."""
    return _MALLOPT is not None and _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


def page_faults() -> int:
    """This process's page faults since it started (minor and major): with the threshold pinned,
    each large tensor is mapped afresh and faulted in page by page (`bench serve` counts them)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS. A CPU tier allocates and frees tensors of every
    size each batch (padded batches, caches growing and cut back); glibc keeps the freed memory in
    its arenas, so resident memory creeps up for a long time although nothing leaks. True if the
    heap was trimmed."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
