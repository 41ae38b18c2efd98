"""A drafter step in-process, one and several rows (BENCHMARKS.md, the OpenMP spin count).

    GOMP_SPINCOUNT=N python drafter_step_spin.py MODEL_DIR 1,8 [CONTEXT]   (PROF=1: a profile of the last)
"""
import os, sys, time, torch
from speccascade.engine.backends import load_backend, ScoreJob
path = os.path.expanduser(sys.argv[1]); rows = [int(x) for x in sys.argv[2].split(",")]
ctx = int(sys.argv[3]) if len(sys.argv) > 3 else 200
torch.set_num_threads(2)
b = load_backend("hf", path, dtype="float32", device="cpu")
print("onednn", b.onednn_linears, "packed", b.packed_linears)
g = torch.Generator().manual_seed(0)
def sessions(n):
    ss = [b.new_session() for _ in range(n)]
    toks = [torch.randint(0, 150000, (ctx,), generator=g).tolist() for _ in ss]
    for s, t in zip(ss, toks): b.score([ScoreJob(s, t, len(t))])
    return ss
for n in rows:
    ss = sessions(n)
    tok = torch.zeros(n, dtype=torch.long)
    ts = []
    for i in range(6):
        t0 = time.perf_counter(); d = b.step(ss, tok); tok = d.argmax(-1); ts.append(time.perf_counter() - t0)
    print(f"rows {n}: step ms", [round(x*1000) for x in ts])
    if n == rows[-1] and os.environ.get("PROF"):
        from torch.profiler import profile
        with profile() as p:
            for i in range(3): d = b.step(ss, tok); tok = d.argmax(-1)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    for s in ss: b.release(s)
