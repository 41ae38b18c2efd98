"""The packaged pair in-process with its oneDNN linear layers on dense weights against the same
layers on weights in oneDNN's blocked layout (`OneDnnLinear.pack`), prompt by prompt (dense,
blocked, dense, ...): per-token latency and whether the outputs are equal. Lossless, γ = 5, greedy;
one engine, its packed layers unpacked and packed again between runs.

    .venv/bin/python benchmarks/serve/onednn/packed_ab.py [PROMPTS [NEW_TOKENS]]
"""

from __future__ import annotations

import statistics
import sys
import time

from speccascade.bench.workload import TASKS
from speccascade.engine.backends.cpu_linear import OneDnnLinear
from speccascade.engine.engine import CascadeEngine
from speccascade.engine.request import GenerationRequest


def main(prompts: int = 4, new_tokens: int = 48) -> None:
    engine = CascadeEngine.load(dtype="auto", progress=False)
    backends = (engine.drafter, engine.expert)
    print(f"dtype {engine.drafter.dtype}; linear layers on oneDNN (blocked layout): " + ", ".join(
        f"{b.name} {b.onednn_linears} ({b.packed_linears})" for b in backends), flush=True)
    packed = [module for backend in backends for module in backend.model.modules()
              if isinstance(module, OneDnnLinear) and module.packed]

    def layout(blocked: bool) -> None:
        for module in packed:
            module.pack() if blocked else module.unpack()

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
        layout(False)
        dense_tokens, dense_s = run(task)
        layout(True)
        packed_tokens, packed_s = run(task)
        speedups.append(dense_s / packed_s)
        print(f"prompt {index}: dense {1e3 * dense_s:.0f} ms/token, blocked {1e3 * packed_s:.0f} ms/token, "
              f"x{speedups[-1]:.2f}, identical {dense_tokens == packed_tokens}", flush=True)
    print(f"speed-up median {statistics.median(speedups):.2f} [{min(speedups):.2f}-{max(speedups):.2f}]")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))
