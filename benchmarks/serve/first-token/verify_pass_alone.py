"""The tiny expert's verify pass alone, in this process, on the main thread and on a worker thread
(as a tier runs it): BENCHMARKS.md, "The first token and the expert's pass, traced".

Run with a tier's process environment to compare with the served pass, e.g.
  LD_PRELOAD=libtcmalloc_minimal.so.4 ONEDNN_PRIMITIVE_CACHE_CAPACITY=256 LRU_CACHE_CAPACITY=256 \
  GOMP_SPINCOUNT=1000 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve/first-token/verify_pass_alone.py
(the replica sets torch's threads to `torch_threads`, 2 here, whatever OMP_NUM_THREADS says)."""

import os
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from speccascade.bench.tiny import qwen_tokenizer, save_pair
from speccascade.engine.backends import load_backend
from speccascade.engine.blocks import DraftPayload
from speccascade.engine.jobs import DraftJob, VerifyJob, draft_blocks, verify_blocks_on
from speccascade.options import Rule, SamplingParams
from transformers import AutoTokenizer

TORCH_THREADS = 2
ROUNDS, WARMUP = 30, 3
SAMPLING = SamplingParams()
PAYLOAD = DraftPayload.for_request(Rule.LOSSLESS, SAMPLING)
PROMPT = list(range(100, 140))


def verify_forward_ms(drafter, expert, run=lambda fn: fn()) -> list[float]:
    """Greedy lossless rounds of one session; each verify pass's forward time, `run` running each
    round (on this thread, or on a worker)."""
    drafter_session, expert_session = drafter.new_session(), expert.new_session()
    context = list(PROMPT)

    def one_round():
        (block,), _ = draft_blocks(drafter, [DraftJob(drafter_session, context, 5, SAMPLING, 0, PAYLOAD)])
        (outcome,), times = verify_blocks_on(expert, [VerifyJob(
            expert_session, context + list(block.tokens), len(context), block, Rule.LOSSLESS, 0.0, SAMPLING, 0)])
        return block, outcome, times.forward_s

    forward = []
    for index in range(ROUNDS):
        block, outcome, forward_s = run(one_round)
        context += list(block.tokens[:outcome.num_accepted]) + [outcome.next_token]
        if index >= WARMUP:
            forward.append(1e3 * forward_s)
    drafter.release(drafter_session)
    expert.release(expert_session)
    return forward


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        drafter_path, expert_path = save_pair(Path(root), qwen_tokenizer(None), hidden=64, layers=(2, 2))
        vocab = len(AutoTokenizer.from_pretrained(expert_path))
        drafter, expert = (load_backend("hf", path, dtype="float32", device="cpu", name=name, vocab_size=vocab)
                           for name, path in (("drafter", drafter_path), ("expert", expert_path)))
        torch.set_num_threads(TORCH_THREADS)
        print(f"torch threads {torch.get_num_threads()}, GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT')}")
        with ThreadPoolExecutor(1) as worker:
            for _ in range(2):  # alternating
                for label, run in (("main thread", lambda fn: fn()), ("worker thread", lambda fn: worker.submit(fn).result())):
                    forward = verify_forward_ms(drafter, expert, run)
                    print(f"{label}: verify forward median {statistics.median(forward):.2f} ms "
                          f"[{min(forward):.2f}-{max(forward):.2f}]")


if __name__ == "__main__":
    main()
