"""Forward passes that take turns across processes: the tiers of one CPU machine each lock one
file around every forward pass (`TierConfig.cpu_lock_file`).

Why: on a small CPU machine both tiers' intra-op threads are spread over the same cores (each tier
alone should use all of them, as the tiers mostly alternate). Under concurrent streams a drafter
pass and an expert pass then run at once, and each pass's OpenMP threads wait in barriers for
threads the other process has preempted: both passes run several times slower than one after the
other. Taking turns gives each pass all the cores; the host work between passes (sampling, the
verify decisions, the event loop) still overlaps.

An advisory lock (flock) on an open file: it is released by the kernel when its process dies, so
a killed replica never leaves the other waiting."""

from __future__ import annotations

import fcntl
import os


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

