"""The packaged pair in-process with its oneDNN linear layers on dense weights against the same
layers on weights in oneDNN's blocked layout (`OneDnnLinear.pack`), prompt by prompt (dense,
blocked, dense, ...): per-token latency and whether the outputs are equal. Lossless, γ = 5, greedy;
one engine, its packed layers unpacked and packed again between runs (in_process_ab.alternate).

    .venv/bin/python benchmarks/serve/onednn/packed_ab.py [PROMPTS [NEW_TOKENS]]
"""

from __future__ import annotations

import sys

from in_process_ab import alternate, switched_linears
from speccascade.engine.engine import CascadeEngine


def main(prompts: int = 4, new_tokens: int = 48) -> None:
    engine = CascadeEngine.load(dtype="auto", progress=False)
    backends = (engine.drafter, engine.expert)
    print(f"dtype {engine.drafter.dtype}; linear layers on oneDNN (blocked layout): " + ", ".join(
        f"{b.name} {b.onednn_linears} ({b.packed_linears})" for b in backends), flush=True)
    packed = [module for module in switched_linears(engine) if module.packed]

    def layout(blocked: bool) -> None:
        for module in packed:
            module.pack() if blocked else module.unpack()

    alternate(engine, layout, ("dense", "blocked"), prompts, new_tokens)


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))
