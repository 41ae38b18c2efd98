"""What a benchmark needs of the machine it shares: one lock that every job loading the real model
pair holds (the pair takes 6-10 GiB; two at once would not fit beside each other's measurements)."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

# The same file `flock(1)` takes, so shell jobs and benchmarks exclude each other.
REAL_MODEL_LOCK = Path(os.environ.get("SPECCASCADE_REAL_MODEL_LOCK", "/tmp/speccascade-real-model.lock"))


@contextmanager
def real_model_lock():
    """Hold the machine-wide real-model lock (`$SPECCASCADE_REAL_MODEL_LOCK`, default
    /tmp/speccascade-real-model.lock) for the duration: waits while another job holds it."""
    REAL_MODEL_LOCK.touch(exist_ok=True)
    with REAL_MODEL_LOCK.open("r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
