"""Where an eight-session verify pass of the packaged expert spends its time: seven sessions of ~200
cached tokens each scoring 6 new tokens in one padded pass (as the expert tier batches them at 8
streams), against one session alone; torch's profiler, operators by CPU time.

    .venv/bin/python benchmarks/serve/packed/profile_batched_verify.py [SESSIONS]
"""

from __future__ import annotations

import random
import sys
import time

import torch
from speccascade.engine.backends.base import ScoreJob
from speccascade.engine.engine import CascadeEngine


def main(sessions: int = 7, cached: int = 200, new: int = 6) -> None:
    engine = CascadeEngine.load(dtype="auto", progress=False)
    expert = engine.expert
    rng = random.Random(0)
    contexts = [[rng.randrange(100, 20_000) for _ in range(cached + 7 * index)] for index in range(sessions)]

    def prefilled(count: int):
        states = [expert.new_session() for _ in range(count)]
        expert.score([ScoreJob(s, c, len(c) - 1) for s, c in zip(states, contexts[:count])])
        return states, [c + [rng.randrange(100, 20_000) for _ in range(new)] for c in contexts[:count]]

    def verify_pass(states, extended) -> float:
        started = time.perf_counter()
        expert.score([ScoreJob(s, c, len(c) - new - 1) for s, c in zip(states, extended)])
        elapsed = time.perf_counter() - started
        for s in states:
            expert.release(s)
        return elapsed

    for count in (1, sessions):
        verify_pass(*prefilled(count))  # warm-up
        times = [verify_pass(*prefilled(count)) for _ in range(3)]
        print(f"{count} session(s), {new} new tokens each: {1e3 * min(times):.0f} ms a pass "
              f"(runs {', '.join(f'{1e3 * t:.0f}' for t in times)})", flush=True)
    states, extended = prefilled(sessions)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        verify_pass(states, extended)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))

if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:2]))
