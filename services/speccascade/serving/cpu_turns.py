"""Forward passes that take turns across processes: the tiers of one CPU machine each lock one
file around every forward pass (`TierConfig.cpu_lock_file`).

Why: on a small CPU machine both tiers' intra-op threads are spread over the same cores (each tier
alone should use all of them, as the tiers mostly alternate). Under concurrent streams a drafter
pass and an expert pass then run at once, and each pass's OpenMP threads wait in barriers for
threads the other process has preempted: both passes run several times slower than one after the
other. Taking turns gives each pass all the cores; the host work between passes (sampling, the
verify decisions, the event loop) still overlaps.

An advisory lock (flock) on an open file: it is released by the kernel when its process dies, so
a killed replica never leaves the other waiting.

Apart from the lock, each pass's threads must not hold the cores once the pass is over
(`cpu_spin_env`)."""

from __future__ import annotations

import fcntl
import os

# torch's OpenMP on Linux (libgomp) keeps a pass's worker threads spinning for more work after
# every parallel region, GOMP_SPINCOUNT iterations before they sleep: 300,000 by default, several
# milliseconds on a 2-core AMD EPYC. Within a pass that spin catches the next operation; after the
# pass it holds a core that the other tier's pass (or the router, or Ray) needs next. Two processes
# taking turns at small matmul passes lost ~6 ms a handoff at the default and nothing at 10,000,
# which cost the same processes nothing alone; served, 1,000 did best (BENCHMARKS.md, serving).
# Read once, when the process's OpenMP starts: it goes into the replica's runtime environment.
SPIN_VARIABLE = "GOMP_SPINCOUNT"


def cpu_spin_env(iterations: int) -> dict[str, str]:
    """The environment variable that lets a process's OpenMP threads spin `iterations` times for more
    work before they sleep (0: sleep at once)."""
    if iterations < 0:
        raise ValueError(f"cpu spin count={iterations} must be >= 0")
    return {SPIN_VARIABLE: str(iterations)}


def cpu_spin_count() -> int | None:
    """The spin count this process's OpenMP threads run with, from its environment; None when unset
    (libgomp's default)."""
    value = os.environ.get(SPIN_VARIABLE, "")
    return int(value) if value.isdigit() else None


class CpuTurns:
    """A context manager: held for one forward pass. One forward thread per process takes it, so
    it needs no lock of its own within the process."""

    def __init__(self, path: str | os.PathLike, *, field: str = "cpu_lock_file"):
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise ValueError(f"{field}={str(path)!r}: cannot open it for locking ({error.strerror})") from None

    def __enter__(self) -> CpuTurns:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

