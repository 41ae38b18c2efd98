"""The packaged pair in-process with torch's fp32 linear layers (the BLAS) against `OneDnnLinear` as
the backends set it up (blocked weights where a weight is a layer's own), prompt by prompt (BLAS,
oneDNN, BLAS, ...): per-token latency and whether the outputs are equal. Lossless, γ = 5, greedy;
one engine, the layers its backends switched put back to dense `nn.Linear` and switched again
between runs. `alternate` runs any such pair of set-ups (packed_ab.py).

    .venv/bin/python benchmarks/serve/onednn/in_process_ab.py [PROMPTS [NEW_TOKENS]]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from speccascade.bench.workload import TASKS
from speccascade.engine.backends.cpu_linear import OneDnnLinear
from speccascade.engine.engine import CascadeEngine
from speccascade.engine.request import GenerationRequest
from torch import nn


def switched_linears(engine: CascadeEngine) -> list[OneDnnLinear]:
    """The layers the engine's backends switched to oneDNN (the larger ones)."""
    return [module for backend in (engine.drafter, engine.expert) for module in backend.model.modules()
            if isinstance(module, OneDnnLinear)]


def alternate(engine: CascadeEngine, set_up: Callable[[bool], None], names: tuple[str, str], prompts: int,
              new_tokens: int) -> None:
    """Each prompt run with `set_up(False)` (`names[0]`) and then `set_up(True)` (`names[1]`): per-token
    latency of each, the speed-up and whether the outputs are equal; the median speed-up at the end."""

    def run(task: str):
        request = GenerationRequest(messages=[{"role": "user", "content": task}], rule="lossless", alpha=0.0,
                                    block_size=5, max_new_tokens=new_tokens, seed=0)
        started = time.perf_counter()
        result = engine.generate(request)
        return result.token_ids, (time.perf_counter() - started) / len(result.token_ids)

    run(TASKS[0])  # warm-up
    speedups = []
    for index in range(prompts):
        task = TASKS[index % len(TASKS)]
        set_up(False)
        before_tokens, before_s = run(task)
        set_up(True)
        after_tokens, after_s = run(task)
        speedups.append(before_s / after_s)
        print(f"prompt {index}: {names[0]} {1e3 * before_s:.0f} ms/token, {names[1]} {1e3 * after_s:.0f} ms/token, "
              f"x{speedups[-1]:.2f}, identical {before_tokens == after_tokens}", flush=True)
    print(f"speed-up median {statistics.median(speedups):.2f} [{min(speedups):.2f}-{max(speedups):.2f}]")


def main(prompts: int = 4, new_tokens: int = 48) -> None:
    engine = CascadeEngine.load(dtype="auto", progress=False)
    print(f"dtype {engine.drafter.dtype}; linear layers switched: drafter {engine.drafter.onednn_linears}, "
          f"expert {engine.expert.onednn_linears}", flush=True)
    switched = switched_linears(engine)
    blocked = [module for module in switched if module.packed]

    def onednn(on: bool) -> None:
        for module in switched:
            if on:
                module.__class__ = OneDnnLinear
            else:
                module.unpack()  # nn.Linear runs on the dense weight only
                module.__class__ = nn.Linear
        for module in blocked if on else ():
            module.pack()

    alternate(engine, onednn, ("blas", "onednn"), prompts, new_tokens)


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))
