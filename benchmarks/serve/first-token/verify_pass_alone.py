import os, sys, time, tempfile, statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import torch
from speccascade.bench.tiny import save_pair, qwen_tokenizer
from speccascade.engine.backends import load_backend
from speccascade.engine.jobs import DraftJob, VerifyJob, draft_blocks, verify_blocks_on
from speccascade.engine.blocks import DraftPayload
from speccascade.options import Rule, SamplingParams
from transformers import AutoTokenizer
root = Path(tempfile.mkdtemp())
tok = qwen_tokenizer(None)
d_path, e_path = save_pair(root, tok, hidden=64, layers=(2, 2))
V = len(AutoTokenizer.from_pretrained(e_path))
dr = load_backend("hf", d_path, dtype="float32", device="cpu", name="d", vocab_size=V)
ex = load_backend("hf", e_path, dtype="float32", device="cpu", name="e", vocab_size=V)
torch.set_num_threads(int(os.environ.get("TT","2")))
print("threads", torch.get_num_threads(), os.environ.get("GOMP_SPINCOUNT"))
sampling = SamplingParams()
payload = DraftPayload.for_request(Rule.LOSSLESS, sampling)
prompt = list(range(100, 140))
def one_round(ds, es, ctx):
    (block,), _ = draft_blocks(dr, [DraftJob(ds, ctx, 5, sampling, 0, payload)])
    seq = ctx + list(block.tokens)
    t = time.perf_counter()
    (out,), w = verify_blocks_on(ex, [VerifyJob(es, seq, len(ctx), block, Rule.LOSSLESS, 0.0, sampling, 0)])
    return w.forward_s, time.perf_counter() - t, out, block
def run(label, executor=None):
    ds, es = dr.new_session(), ex.new_session()
    ctx = list(prompt)
    fw = []
    for i in range(30):
        f = (lambda: one_round(ds, es, ctx))
        r = executor.submit(f).result() if executor else f()
        fwd, wall, out, block = r
        ctx += list(block.tokens[:out.num_accepted]) + [out.next_token]
        if i >= 3: fw.append(fwd * 1e3)
    dr.release(ds); ex.release(es)
    print(f"{label}: verify forward median {statistics.median(fw):.2f} ms  [{min(fw):.2f}-{max(fw):.2f}]")
ex_thread = ThreadPoolExecutor(1)
for rep in range(2):
    run("main thread")
    run("executor thread", ex_thread)
