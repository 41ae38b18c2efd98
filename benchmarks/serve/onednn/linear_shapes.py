"""torch's fp32 `nn.Linear` (the BLAS's sgemm) against `OneDnnLinear` (oneDNN's matmul on the same
dense weight) for the packaged pair's layer shapes and the rows a decoding pass feeds: one token
(a draft step), six (a γ = 5 verify), eight (an 8-session draft step), 48 (an 8-session verify).
Interleaved shape by shape; milliseconds per call, median of `REPEATS`, two threads as a tier.

    .venv/bin/python benchmarks/serve/onednn/linear_shapes.py
"""

from __future__ import annotations

import statistics
import time

import torch
from speccascade.engine.backends.cpu_linear import OneDnnLinear
from torch import nn

REPEATS = 7
ROWS = (1, 6, 8, 48)
SHAPES = {  # (out, in) of each distinct linear layer
    "0.5B q/o": (896, 896), "0.5B k/v": (128, 896), "0.5B MLP up/gate": (4864, 896), "0.5B MLP down": (896, 4864),
    "0.5B output": (151936, 896), "1.5B q/o": (1536, 1536), "1.5B k/v": (256, 1536),
    "1.5B MLP up/gate": (8960, 1536), "1.5B MLP down": (1536, 8960), "1.5B output": (151936, 1536),
}


def per_call_ms(layer: nn.Module, x: torch.Tensor) -> float:
    layer(x)
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, 2 threads; ms per call, BLAS / oneDNN (speed-up), outputs equal")
    with torch.inference_mode():
        for name, (out_features, in_features) in SHAPES.items():
            blas = nn.Linear(in_features, out_features, bias=name.endswith("q/o") or name.endswith("k/v"))
            onednn = nn.Linear(in_features, out_features, bias=blas.bias is not None)
            onednn.load_state_dict(blas.state_dict())
            onednn.__class__ = OneDnnLinear
            cells = []
            for rows in ROWS:
                x = torch.randn(rows, in_features)
                a, b = per_call_ms(blas, x), per_call_ms(onednn, x)
                cells.append(f"{rows} rows {a:7.2f} / {b:6.2f} ({a / b:.2f}x) {torch.equal(blas(x), onednn(x))}")
            print(f"{name:18s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
