"""Forward passes that take turns across processes: the tiers of one CPU machine lock one file
around each batch and its passes (`TierConfig.cpu_lock_file`; the batcher takes the turn before
it forms a batch, `batching.ContinuousBatcher`).

Why: on a small CPU machine both tiers' intra-op threads are spread over the same cores (each tier
alone should use all of them, as the tiers mostly alternate). Under concurrent streams a drafter
pass and an expert pass then run at once, and each pass's OpenMP threads wait in barriers for
threads the other process has preempted: both passes run several times slower than one after the
other. Taking turns gives each pass all the cores; the host work between turns (the router, the
calls, the event loops) still overlaps.

An advisory lock (flock) on an open file: it is released by the kernel when its process dies, so
a killed replica never leaves the other waiting.

Apart from the lock, each pass's threads must not hold the cores once the pass is over
(`cpu_spin_env`)."""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Sequence

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
    """The turn of one process's forward thread on the shared cores. A context manager (one forward
    pass), and `acquire`/`release` for a batch that holds the turn across its passes (the batcher
    takes the turn before it forms the batch, `ContinuousBatcher`). Re-entrant: a pass inside a held
    turn takes nothing more. Within a process the turn is taken and given back one step after
    another (the batcher awaits each), so it needs no lock of its own.

    The turn carries a note: a process giving it back names the sessions whose calls it has just
    answered (`release(handoff)`), and the next to take it reads them (`acquire()`): those sessions'
    next calls are on their way to the other tier, which can wait the moment they take to arrive
    rather than run a batch without them. The note lives in the locked file, read and written only
    by the turn's holder.

    Turns alternate while both sides have work: a process about to wait for the turn says so (a
    shared lock on a second file, `<path>.waiting`), and one giving the turn back does not take it
    again at once while another waits (`try_acquire`); flock itself wakes its waiters in no order,
    so a tier with a queue of prompt chunks would otherwise keep the cores turn after turn while
    the other tier's decode batch waits."""

    def __init__(self, path: str | os.PathLike, *, field: str = "cpu_lock_file"):
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            self._waiting = os.open(f"{path}.waiting", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise ValueError(f"{field}={str(path)!r}: cannot open it for locking ({error.strerror})") from None
        self._held = 0
        # The note's first line names who wrote it: a holder that takes the turn again before the other
        # tier has had it reads its own note, whose sessions it has just answered (their next calls
        # are on their way to the other tier, not here), and must not wait for them.
        self._writer = secrets.token_hex(8)

    @property
    def held(self) -> bool:
        return self._held > 0

    def acquire(self) -> tuple[str, ...]:
        """Take the turn (wait for it); the sessions the last holder handed over (none when the turn
        was already held here)."""
        return self._take(blocking=True)  # type: ignore[return-value]

    def try_acquire(self) -> tuple[str, ...] | None:
        """Take the turn if nobody holds it and no other process waits for it (without waiting:
        callable from an event loop); the sessions handed over, or None."""
        return self._take(blocking=False)

    def others_waiting(self) -> bool:
        """Whether another process waits for the turn."""
        try:
            fcntl.flock(self._waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._waiting, fcntl.LOCK_UN)
        return False

    def _take(self, *, blocking: bool) -> tuple[str, ...] | None:
        if self._held:
            self._held += 1
            return ()
        if blocking:
            fcntl.flock(self._waiting, fcntl.LOCK_SH)  # seen by a holder about to take the turn again
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            finally:
                fcntl.flock(self._waiting, fcntl.LOCK_UN)
        else:
            if self.others_waiting():
                return None
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
        self._held = 1
        writer, _, sessions = os.pread(self._fd, os.fstat(self._fd).st_size, 0).decode().partition("\n")
        return tuple(sessions.split("\n")) if sessions and writer != self._writer else ()

    def release(self, handoff: Sequence[str] = ()) -> None:
        """Give the turn back, naming the sessions whose calls this turn answered (a release without
        a turn held does nothing: its acquire was cancelled before it ran)."""
        if self._held == 0:
            return
        self._held -= 1
        if self._held == 0:
            note = "\n".join((self._writer, *handoff)).encode()
            try:
                os.pwrite(self._fd, note, 0)
                os.ftruncate(self._fd, len(note))
            finally:  # a note that could not be written must not keep the other tier off the cores
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def __enter__(self) -> CpuTurns:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
