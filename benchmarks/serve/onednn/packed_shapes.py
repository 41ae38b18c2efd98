"""oneDNN's fp32 matmul on the dense weight (`OneDnnLinear`, what the tiers run) against the same
matmul on a weight reordered once into oneDNN's blocked layout (`_reorder_linear_weight`, packed
for a given number of rows), for the packaged pair's layer shapes and the rows a decoding pass
feeds: one (a draft step), six (a γ = 5 verify), eight (an 8-session draft step), 48 (an 8-session
verify). Interleaved call by call; milliseconds per call, median of `REPEATS`, two threads as a tier.

    .venv/bin/python benchmarks/serve/onednn/packed_shapes.py
"""

from __future__ import annotations

import statistics
import time

import torch

REPEATS = 9
ROWS = (1, 2, 6, 8, 16, 48)
PACKED_FOR = (1, 8)
SHAPES = {  # (out, in)
    "0.5B q/o": (896, 896), "0.5B MLP up/gate": (4864, 896), "0.5B MLP down": (896, 4864),
    "0.5B output": (151936, 896), "1.5B q/o": (1536, 1536),
    "1.5B MLP up/gate": (8960, 1536), "1.5B MLP down": (1536, 8960), "1.5B output": (151936, 1536),
}


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def main() -> None:
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, 2 threads; ms per call: dense / packed for 1 row / packed for 8 rows")
    with torch.inference_mode():
        for name, (out_features, in_features) in SHAPES.items():
            dense = torch.randn(out_features, in_features) / in_features ** 0.5
            weights = [dense] + [torch.ops.mkldnn._reorder_linear_weight(dense, rows) for rows in PACKED_FOR]
            cells = []
            for rows in ROWS:
                x = torch.randn(rows, in_features)
                reference = linear(x, dense)
                for weight in weights[1:]:
                    assert torch.allclose(linear(x, weight), reference, rtol=1e-4, atol=1e-4)
                times: list[list[float]] = [[] for _ in weights]
                for _ in range(REPEATS):
                    for index, weight in enumerate(weights):
                        started = time.perf_counter()
                        linear(x, weight)
                        times[index].append(time.perf_counter() - started)
                medians = [1e3 * statistics.median(t) for t in times]
                cells.append(f"{rows:2d} rows " + " / ".join(f"{m:6.2f}" for m in medians))
            print(f"{name:17s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
