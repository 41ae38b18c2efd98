"""The packaged pair in-process with torch's fp32 linear layers (the BLAS) against `OneDnnLinear`,
prompt by prompt (BLAS, oneDNN, BLAS, ...): per-token latency and whether the outputs are equal.
Lossless, γ = 5, greedy; one engine, the layers its backends switched put back to `nn.Linear` and
switched again between runs.

    .venv/bin/python benchmarks/serve/onednn/in_process_ab.py [PROMPTS [NEW_TOKENS]]
"""

from __future__ import annotations

import statistics
import sys
import time

from speccascade.bench.workload import TASKS
from speccascade.engine.backends.cpu_linear import OneDnnLinear
from speccascade.engine.engine import CascadeEngine
from speccascade.engine.request import GenerationRequest
from torch import nn


def main(prompts: int = 4, new_tokens: int = 48) -> None:
    engine = CascadeEngine.load(dtype="auto", progress=False)
    print(f"dtype {engine.drafter.dtype}; linear layers switched: drafter {engine.drafter.onednn_linears}, "
          f"expert {engine.expert.onednn_linears}", flush=True)

    switched = [module for backend in (engine.drafter, engine.expert) for module in backend.model.modules()
                if type(module) is OneDnnLinear]  # the layers the backends switched (the larger ones)

    def linears_as(cls: type[nn.Linear]) -> None:
        for module in switched:
            module.__class__ = cls

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
        linears_as(nn.Linear)
        blas_tokens, blas_s = run(task)
        linears_as(OneDnnLinear)
        onednn_tokens, onednn_s = run(task)
        speedups.append(blas_s / onednn_s)
        print(f"prompt {index}: blas {1e3 * blas_s:.0f} ms/token, onednn {1e3 * onednn_s:.0f} ms/token, "
              f"x{speedups[-1]:.2f}, identical {blas_tokens == onednn_tokens}", flush=True)
    print(f"speed-up median {statistics.median(speedups):.2f} [{min(speedups):.2f}-{max(speedups):.2f}]")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))
