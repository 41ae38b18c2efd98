"""Per-call service times of the two tiers, measured once on this machine with the real pair.

A drafter call drafts gamma tokens (gamma single-token forward steps with a warm KV cache); an
expert call verifies a block (one forward pass over the gamma drafted tokens plus the token emitted
after the previous block). These are the costs the autoscaling simulation charges per call.
"""

from __future__ import annotations

import fcntl
import json
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

REAL_MODEL_LOCK = Path("/tmp/speccascade-real-model.lock")


@dataclass(frozen=True)
class ServiceTimes:
    """Median seconds per tier call, and how they were measured."""

    block_size: int  # gamma of the measured calls
    drafter_step_s: float  # one drafter forward step (1 new token)
    drafter_call_s: float  # one draft call: gamma steps
    expert_verify_s: float  # one verify call: a pass over gamma + 1 new tokens
    dtype: str
    threads: int
    repeats: int
    machine: str
    drafter: str
    expert: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ServiceTimes":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(
                f"no service-time file at {str(path)!r}: measure it once with "
                "`speccascade bench autoscale --measure`"
            ) from None
        return cls(**data)


@contextmanager
def real_model_lock():
    """The machine-wide lock every job that loads the real pair holds (same file as flock(1))."""
    REAL_MODEL_LOCK.touch(exist_ok=True)
    with REAL_MODEL_LOCK.open("r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def measure(*, block_size: int = 5, repeats: int = 12, prompt_tokens: int = 128, dtype: str = "bf16",
            threads: int = 2) -> ServiceTimes:
    """Load the packaged pair (under the lock) and time drafter steps and expert verify passes
    in steady state: warm caches, the context growing by one block per repeat."""
    import torch

    from ..engine.runner import ModelRunner
    from ..engine.sources import DRAFTER_DEFAULT, EXPERT_DEFAULT, resolve_model

    torch.set_num_threads(threads)
    with real_model_lock():
        drafter = ModelRunner.load(resolve_model(DRAFTER_DEFAULT).path, dtype=dtype, name=DRAFTER_DEFAULT)
        expert = ModelRunner.load(resolve_model(EXPERT_DEFAULT).path, dtype=dtype, name=EXPERT_DEFAULT)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(100, 20000, (prompt_tokens,), generator=gen).tolist()
        d_session, e_session = drafter.new_session(), expert.new_session()
        drafter.next_distribution(d_session, tokens)  # prefill, not timed
        expert.next_distribution(e_session, tokens)
        steps, verifies = [], []
        for repeat in range(repeats + 1):  # the first block warms up kernels and is not kept
            block = []
            for _ in range(block_size):
                start = time.perf_counter()
                q = drafter.next_distribution(d_session, tokens + block)
                elapsed = time.perf_counter() - start
                block.append(int(q.argmax()))
                if repeat:
                    steps.append(elapsed)
            start = time.perf_counter()
            expert.distributions(e_session, tokens + block, start=len(tokens))
            elapsed = time.perf_counter() - start
            if repeat:
                verifies.append(elapsed)
            tokens = tokens + block + [int(torch.randint(100, 20000, (1,), generator=gen))]
    step = statistics.median(steps)
    return ServiceTimes(
        block_size=block_size, drafter_step_s=step, drafter_call_s=step * block_size,
        expert_verify_s=statistics.median(verifies), dtype=dtype, threads=threads, repeats=repeats,
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        drafter=DRAFTER_DEFAULT, expert=EXPERT_DEFAULT,
    )
