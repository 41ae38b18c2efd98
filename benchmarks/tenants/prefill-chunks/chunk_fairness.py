"""A tenant's short prompt arriving just after another tenant's long one, on one expert tier
replica (in this process, no Ray): how long until the short prompt is prefilled and verified.

Run once per code version (PYTHONPATH picks it), alternating versions; prints one JSON line:
    python chunk_fairness.py MODEL_DIR --trials 3 --long 2048 --short 64
The long prompt is tenant "bulk"'s, the short one tenant "chat"'s; both are empty-block verifies
(what the router's early prefill sends), with prefill_chunk_tokens 256 and prefill_pass_prompts 1
(the default): a pass feeds one 256-token chunk. "alone" is the short prompt with nothing else.
"""

import argparse
import asyncio
import json
import random
import time

from speccascade.config.app import TierConfig
from speccascade.engine.blocks import EMPTY_BLOCK
from speccascade.options import Rule, SamplingParams
from speccascade.serving.tiers import ExpertTier
from speccascade.serving.wire import SentTokens, VerifyCall
from speccascade.tenancy.fairness import Share


def call(session: str, tokens: list[int], tenant: str) -> VerifyCall:
    return VerifyCall(session, SentTokens().delta(tokens, whole=True), len(tokens), EMPTY_BLOCK, Rule.LOSSLESS, 0.0,
                      SamplingParams(), 0, Share(tenant))


async def timed(tier: ExpertTier, verify: VerifyCall) -> float:
    started = time.perf_counter()
    await tier.verify(verify)
    return time.perf_counter() - started


async def main(args) -> dict:
    tier = ExpertTier(TierConfig(model=args.model, max_batch_size=8, prefill_chunk_tokens=256, prefill_pass_prompts=1))
    rng = random.Random(0)
    prompt = lambda n: [rng.randrange(1000, 20000) for _ in range(n)]  # noqa: E731
    await timed(tier, call("warm", prompt(300), "chat"))  # first passes: allocations, kernels
    await tier.release("warm")
    out = {"alone": [], "beside": [], "bulk": []}
    for trial in range(args.trials):
        out["alone"].append(await timed(tier, call(f"alone{trial}", prompt(args.short), "chat")))
        await tier.release(f"alone{trial}")
        bulk = asyncio.ensure_future(timed(tier, call(f"bulk{trial}", prompt(args.long), "bulk")))
        await asyncio.sleep(0.2)  # the long prompt's first chunk is in the model
        out["beside"].append(await timed(tier, call(f"chat{trial}", prompt(args.short), "chat")))
        out["bulk"].append(await bulk)
        for session in (f"bulk{trial}", f"chat{trial}"):
            await tier.release(session)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--long", type=int, default=2048)
    parser.add_argument("--short", type=int, default=64)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
