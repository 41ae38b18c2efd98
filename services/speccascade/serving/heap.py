"""A tier replica's C allocator: fast passes and flat resident memory over a long run.

torch takes every CPU tensor from the process's malloc. Under glibc's, with its mmap threshold
pinned (`pin_mmap_threshold`) and the heap trimmed between batches (`trim_heap`), resident memory
stays flat, but each large tensor (logits, padded batches) is mapped and faulted in afresh every
pass. jemalloc and tcmalloc keep freed memory for the next pass, and the passes run faster
(measured in BENCHMARKS.md, serving and soak). `allocator_env` preloads one into a replica's
process; `prepare_allocator` checks, in the replica, which one it got.

Apart from the allocator, torch's CPU matmuls keep a compiled kernel for every matrix shape they
have seen (`kernel_cache_env` bounds how many).

`replica_process_stats` is what a replica, tier or router, reports of its process."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from dataclasses import dataclass
from pathlib import Path


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


# The shared libraries preloaded for each allocator, named by soname so that ld.so finds them on
# any architecture, and the Debian/Ubuntu packages that install them (the images and
# scripts/install_allocators.sh install these).
ALLOCATOR_LIBRARIES = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
ALLOCATOR_PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}
# jemalloc's background thread hands pages unused for 10 s back to the OS even when the replica is
# idle (without it, purging happens only inside later allocations); oversize_threshold:0 keeps
# allocations over 8 MiB (an 8-row batch of logits) in the same reuse instead of purging them at once.
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:10000,oversize_threshold:0"


def _library_stem(name: str) -> str:
    return ALLOCATOR_LIBRARIES[name].split(".so")[0]  # libjemalloc


def allocator_installed(name: str) -> bool:
    """Whether this machine's dynamic loader finds the allocator's library."""
    return ctypes.util.find_library(_library_stem(name).removeprefix("lib")) is not None


# What `auto` preloads: the fastest in the serving benchmarks, no more memory than glibc's in the soak.
AUTO_ALLOCATOR = "tcmalloc"


def allocator_env(name: str) -> dict[str, str]:
    """Environment variables that give a replica's process the allocator: LD_PRELOAD takes effect
    only when a process starts, so they go into the replica's runtime environment. `auto` preloads
    tcmalloc whatever this machine has: the replica may start on another node, and where the
    library is missing there, the loader skips it (with a warning) and the process runs on glibc."""
    if name == "auto":
        name = AUTO_ALLOCATOR
    if name not in ALLOCATOR_LIBRARIES:  # glibc's malloc: nothing to preload
        return {}
    env = {"LD_PRELOAD": ALLOCATOR_LIBRARIES[name]}
    if name == "jemalloc":
        env["MALLOC_CONF"] = JEMALLOC_CONF
    return env


def running_allocator(maps: Path = Path("/proc/self/maps")) -> str:
    """The allocator this process runs on: jemalloc or tcmalloc when its library is mapped (it was
    preloaded), else glibc."""
    try:
        mapped = maps.read_text()
    except OSError:
        return "glibc"
    for name in ALLOCATOR_LIBRARIES:
        if f"/{_library_stem(name)}.so" in mapped:
            return name
    return "glibc"


def prepare_allocator(requested: str, *, field: str = "allocator") -> str:
    """In a replica at start: the allocator it runs on, glibc's mmap threshold pinned when it is
    glibc's. A ValueError when jemalloc or tcmalloc was asked for and is not loaded (not installed
    on this node); `auto` takes what it got."""
    running = running_allocator()
    if requested in ALLOCATOR_LIBRARIES and running != requested:
        preload = os.environ.get("LD_PRELOAD", "")
        raise ValueError(f"{field}={requested!r}: {ALLOCATOR_LIBRARIES[requested]} is not loaded in this replica "
                         f"(LD_PRELOAD={preload!r}); install it on every node (Debian/Ubuntu: "
                         f"{ALLOCATOR_PACKAGES[requested]}) or set {field} to glibc")
    if running == "glibc":
        pin_mmap_threshold()
    return running


# torch runs CPU matmuls in bf16 through oneDNN, which JIT-compiles a kernel for each new matrix
# shape, and a pass's shapes follow its rows x tokens: prompt chunks, verify blocks and batches of
# every size keep adding new ones. Two caches keep the kernels, oneDNN's own and torch's (ideep's),
# up to 1,024 each by default, ~0.3 MiB apiece per cache for the packaged drafter's layers: one
# process running it over 192 new shapes kept 604 MB more (38 MB with both bounded at 64). Both
# variables are read once, at the process's first matmul, so they go into the replica's runtime
# environment with the allocator's.
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def kernel_cache_env(entries: int) -> dict[str, str]:
    """Environment variables that keep at most `entries` compiled CPU kernels in each cache (at
    least 1: torch 2.13 crashes on its first bf16 matmul with LRU_CACHE_CAPACITY=0)."""
    if entries < 1:
        raise ValueError(f"kernel cache entries={entries} must be >= 1")
    return {name: str(entries) for name in KERNEL_CACHE_VARIABLES}


def kernel_cache_entries() -> int | None:
    """The bound this process's kernel caches run with, from its environment; None when unset or
    when the two caches were given different bounds (then the libraries' defaults or a mix apply)."""
    values = {os.environ.get(name) for name in KERNEL_CACHE_VARIABLES}
    if len(values) != 1 or None in values:
        return None
    (value,) = values
    return int(value) if value.isdigit() else None


def describe_allocator(requested: str, running: str) -> str:
    """The replica's log words for its allocator: which one, and for `auto`, why."""
    if requested != "auto":
        return f"{running} allocator"
    if running == AUTO_ALLOCATOR:
        return f"{running} allocator (auto)"
    library = ALLOCATOR_LIBRARIES[AUTO_ALLOCATOR]
    if allocator_installed(AUTO_ALLOCATOR):  # a tier built in a process Serve did not start
        return f"{running} allocator (auto: {library} is installed but was not preloaded into this process)"
    return f"{running} allocator (auto: {library} is not installed on this node; " \
           f"Debian/Ubuntu: {ALLOCATOR_PACKAGES[AUTO_ALLOCATOR]})"


@dataclass(frozen=True)
class ProcessStats:
    """One Serve replica's process (soak tests, operators)."""

    replica_id: str
    pid: int
    rss_bytes: int  # resident memory
    allocator: str  # the C allocator it runs on


def replica_process_stats(allocator: str) -> ProcessStats:
    """The calling Serve replica's `ProcessStats`."""
    import psutil
    from ray import serve

    return ProcessStats(serve.get_replica_context().replica_id.unique_id, os.getpid(),
                        psutil.Process().memory_info().rss, allocator)
