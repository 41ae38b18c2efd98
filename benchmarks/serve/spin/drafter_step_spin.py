"""A drafter step in-process at one and several rows (BENCHMARKS.md, the OpenMP spin count): each
row a session with a random context, six steps timed a batch size (the first is the warm-up).

    GOMP_SPINCOUNT=N .venv/bin/python benchmarks/serve/spin/drafter_step_spin.py MODEL_DIR 1,8 [CONTEXT]

PROF=1 also prints torch's profile of three steps at the last batch size. (`speccascade bench
backend` times steps per backend and batch size too, over random-weight shapes and a CUDA-graph
reference; this script takes the model as the tiers load it, blocked fp32 weights included.)
"""

from __future__ import annotations

import os
import sys
import time

import torch
from speccascade.engine.backends import ScoreJob, load_backend

STEPS = 6


def main(path: str, batches: str, context: int = 200) -> None:
    torch.set_num_threads(2)
    backend = load_backend("hf", os.path.expanduser(path), dtype="float32", device="cpu")
    print("onednn", backend.onednn_linears, "packed", backend.packed_linears)
    generator = torch.Generator().manual_seed(0)
    sizes = [int(size) for size in batches.split(",")]
    for rows in sizes:
        sessions = [backend.new_session() for _ in range(rows)]
        for session in sessions:
            tokens = torch.randint(0, 150_000, (context,), generator=generator).tolist()
            backend.score([ScoreJob(session, tokens, len(tokens))])
        token = torch.zeros(rows, dtype=torch.long)
        times = []
        for _ in range(STEPS):
            started = time.perf_counter()
            token = backend.step(sessions, token).argmax(-1)
            times.append(time.perf_counter() - started)
        print(f"rows {rows}: step ms", [round(1e3 * t) for t in times])
        if rows == sizes[-1] and os.environ.get("PROF"):
            from torch.profiler import profile

            with profile() as profiled:
                for _ in range(3):
                    token = backend.step(sessions, token).argmax(-1)
            print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        for session in sessions:
            backend.release(session)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(arg) for arg in sys.argv[3:4]))
