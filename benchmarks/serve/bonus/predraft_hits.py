import tempfile, sys
from pathlib import Path
from speccascade.bench.serve.cli import tiny_pair
import speccascade
from speccascade.engine.request import GenerationRequest
from speccascade.options import SamplingParams
root = Path(tempfile.mkdtemp())
drafter, expert = tiny_pair(root, None)
engine = speccascade.load_engine(drafter, expert, dtype="fp32")
tot = {}
for seed in range(6):
    for rule, alpha in (("lossless", 0.0), ("token", 1.0)):
        for temp in (1.0, 0.7):
            r = engine.generate(GenerationRequest(prompt="Write a Python function that checks whether a number is prime.", rule=rule, alpha=alpha,
                                 max_new_tokens=48, sampling=SamplingParams(temperature=temp), seed=seed, ignore_eos=True, pipeline="on"))
            s = r.stats
            t = tot.setdefault(f"{rule} T={temp}", [0, 0, 0, 0])
            t[0] += s.rounds; t[1] += s.bonus; t[2] += s.predrafts; t[3] += s.predrafts_used
print(sys.argv[1], {k: dict(rounds=v[0], bonus=v[1], predrafts=v[2], used=v[3]) for k, v in tot.items()})
