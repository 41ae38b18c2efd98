"""A drafter decode step in-process, with the pass's OpenMP threads stopped after it or not
(BENCHMARKS.md, "Tried, not adopted: OpenMP threads stopped after each batch"): the step's time at
one and eight rows, and the CPU the idle process burns in the 20 ms after each step.

    GOMP_SPINCOUNT=N .venv/bin/python benchmarks/serve/release/step_release.py keep|release [MODEL]

`release` calls OpenMP 5.0's omp_pause_resource_all(omp_pause_soft) on torch's libgomp after every
step, which ends the calling thread's worker threads (the next parallel region starts them again).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import torch
from speccascade.engine.backends import ScoreJob, load_backend
from speccascade.models import resolve_model

STEPS = 12  # the first two are not counted
OMP_PAUSE_SOFT = 1


def main(mode: str, model: str = "qwen2.5-coder-0.5b-instruct") -> None:
    libgomp = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1"))
    pause = libgomp.omp_pause_resource_all
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    torch.set_num_threads(2)
    backend = load_backend("hf", resolve_model(model, progress=False).path, dtype="auto", device="cpu")
    generator = torch.Generator().manual_seed(0)
    figures = []
    for rows in (1, 8):
        sessions = [backend.new_session() for _ in range(rows)]
        for session in sessions:
            context = torch.randint(0, 150_000, (200,), generator=generator).tolist()
            backend.score([ScoreJob(session, context, len(context))])
        token = torch.zeros(rows, dtype=torch.long)
        step_ms, idle_cpu_ms = [], []
        for index in range(STEPS):
            started = time.perf_counter()
            token = backend.step(sessions, token).argmax(-1)
            elapsed = time.perf_counter() - started
            if mode == "release":
                pause(OMP_PAUSE_SOFT)
            cpu = time.process_time()
            time.sleep(0.02)  # idle, as a tier between its batches
            if index >= 2:
                step_ms.append(1e3 * elapsed)
                idle_cpu_ms.append(1e3 * (time.process_time() - cpu))
        step_ms.sort()
        idle_cpu_ms.sort()
        figures.append(f"rows {rows}: step p50 {step_ms[len(step_ms) // 2]:.1f} ms, "
                       f"CPU in 20 ms idle {idle_cpu_ms[len(idle_cpu_ms) // 2]:.2f} ms")
        for session in sessions:
            backend.release(session)
    print(mode, "spin", os.environ.get("GOMP_SPINCOUNT", "default"), backend.dtype, " | ".join(figures))


if __name__ == "__main__":
    main(*sys.argv[1:3])
