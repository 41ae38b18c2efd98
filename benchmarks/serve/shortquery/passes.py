"""Draft blocks (the 0.5B) and 6-token verify passes (the 1.5B) of the packaged pair through the hf
backend, at batches of 1, 4 and 8 sessions, with bf16's short-query attention off (SDPA's flash
kernel: SHORT_QUERY_TOKENS = 0) and on (8), alternating call by call in one process; the sessions'
contexts start at CONTEXT tokens (+7 a session, so a batch is padded and masked, as a tier's is) and
grow by 3 a call. Run with the tiers' allocator preloaded, as they run:

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
    python benchmarks/serve/shortquery/passes.py qwen2.5-coder-0.5b-instruct draft 6 150
    python benchmarks/serve/shortquery/passes.py qwen2.5-coder-1.5b-instruct verify 6 150
"""

import statistics
import sys
import time

import torch
from speccascade.engine.backends import ScoreJob, attention, load_backend
from speccascade.engine.blocks import DraftPayload
from speccascade.engine.jobs import DraftJob, draft_blocks
from speccascade.models import resolve_model
from speccascade.options import Rule, SamplingParams

name, kind, reps, context = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
backend = load_backend("hf", resolve_model(name, progress=False).path, dtype="auto", device="cpu")
generator = torch.Generator().manual_seed(0)
contexts = [torch.randint(0, 150_000, (context + 7 * i,), generator=generator).tolist() for i in range(8)]
sessions = [backend.new_session() for _ in contexts]
greedy = SamplingParams()
payload = DraftPayload.for_request(Rule.LOSSLESS, greedy)


def draft(n: int) -> float:
    jobs = [DraftJob(sessions[i], contexts[i], 5, greedy, 0, payload) for i in range(n)]
    started = time.perf_counter()
    blocks, _ = draft_blocks(backend, jobs)
    elapsed = time.perf_counter() - started
    for i, block in zip(range(n), blocks):  # three of five kept, as a round might
        contexts[i] = contexts[i] + [int(t) for t in block.tokens[:3]]
    return elapsed


def verify(n: int) -> float:
    new = [torch.randint(0, 150_000, (6,), generator=generator).tolist() for _ in range(n)]
    started = time.perf_counter()
    backend.score([ScoreJob(sessions[i], contexts[i] + new[i], len(contexts[i])) for i in range(n)])
    elapsed = time.perf_counter() - started
    for i in range(n):
        contexts[i] = contexts[i] + new[i][:3]
    return elapsed


work = draft if kind == "draft" else verify
work(8), work(1)  # caches filled, first-call costs paid
times: dict[tuple[int, str], list[float]] = {}
for _ in range(reps):
    for n in (1, 4, 8):
        for mode, tokens in (("sdpa", 0), ("short", 8)):
            attention.SHORT_QUERY_TOKENS = tokens
            times.setdefault((n, mode), []).append(1e3 * work(n))
for n in (1, 4, 8):
    sdpa, short = times[(n, "sdpa")], times[(n, "short")]
    ratios = sorted(b / a for a, b in zip(sdpa, short))
    print(f"{name} {kind}, batch {n}: SDPA {statistics.median(sdpa):.0f} ms, short-query {statistics.median(short):.0f} "
          f"ms; short / SDPA {statistics.median(ratios):.2f} [{ratios[0]:.2f}-{ratios[-1]:.2f}] ({reps} pairs, "
          f"contexts ~{len(contexts[0])} tokens at the end)", flush=True)
