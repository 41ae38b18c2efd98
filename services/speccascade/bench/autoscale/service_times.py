"""Per-call service times of the two tiers, measured once on this machine with the real pair.

A drafter call drafts gamma tokens (gamma single-token forward steps with a warm KV cache); an
expert call verifies a block (one forward pass over the gamma drafted tokens plus the token emitted
after the previous block). These are the costs the autoscaling simulation charges per call.
"""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from ..machine import real_model_lock


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


def measure(*, block_size: int = 5, repeats: int = 12, prompt_tokens: int = 128, dtype: str = "bf16",
            threads: int = 2) -> ServiceTimes:
    """Load the packaged pair (under the lock) and time the decoding loop's own draft and verify
    calls (lossless, greedy) in steady state: warm caches, the context growing by a block a round."""
    import asyncio

    import torch

    from ...engine.engine import CascadeEngine
    from ...engine.loop import speculative_rounds
    from ...engine.request import GenerationRequest
    from ...engine.roles import LocalDrafter, LocalExpert
    from ...models import DRAFTER_DEFAULT, EXPERT_DEFAULT

    torch.set_num_threads(threads)
    # Pipelining off: a drafter step and a verify are timed one at a time.
    request = GenerationRequest(prompt="service-time probe", rule="lossless", block_size=block_size, seed=0,
                                pipeline="off")
    prompt = torch.randint(100, 20000, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()

    async def time_rounds(engine: CascadeEngine) -> tuple[list[float], list[float]]:
        steps, verifies = [], []
        rounds = speculative_rounds(LocalDrafter(engine.drafter), LocalExpert(engine.expert), prompt, request,
                                    limit=request.max_new_tokens)
        warm = False
        async for record in rounds:  # the first round prefills and warms up kernels: not kept
            if warm:
                steps.append(record.drafter_seconds / record.drafter_passes)
                verifies.append(record.expert_seconds)
            warm = True
            if len(verifies) == repeats:
                break
        await rounds.aclose()
        return steps, verifies

    with real_model_lock():
        engine = CascadeEngine.load(DRAFTER_DEFAULT, EXPERT_DEFAULT, dtype=dtype, device="cpu")
        steps, verifies = asyncio.run(time_rounds(engine))
    step = statistics.median(steps)
    return ServiceTimes(
        block_size=block_size, drafter_step_s=step, drafter_call_s=step * block_size,
        expert_verify_s=statistics.median(verifies), dtype=dtype, threads=threads, repeats=repeats,
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        drafter=DRAFTER_DEFAULT, expert=EXPERT_DEFAULT,
    )
