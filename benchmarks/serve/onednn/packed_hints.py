"""oneDNN's blocked weight layout reordered for 2, 4, 8, 16 and 32 rows against the dense weight, for
three of the packaged pair's layer shapes and 1-48 rows: ms per call (dense/p2/p4/...), 2 threads,
median of 11, interleaved call by call.

    .venv/bin/python benchmarks/serve/onednn/packed_hints.py
"""

from __future__ import annotations

import statistics
import time

import torch

HINTS = (2, 4, 8, 16, 32)
SHAPES = {"0.5B up": (4864, 896), "1.5B down": (1536, 8960), "1.5B up": (8960, 1536)}


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def main() -> None:
    torch.set_num_threads(2)
    with torch.inference_mode():
        for name, (out_features, in_features) in SHAPES.items():
            dense = torch.randn(out_features, in_features)
            weights = [dense] + [torch.ops.mkldnn._reorder_linear_weight(dense, hint) for hint in HINTS]
            cells = []
            for rows in (1, 2, 4, 6, 8, 16, 48):
                x = torch.randn(rows, in_features)
                times: list[list[float]] = [[] for _ in weights]
                for _ in range(11):
                    for index, weight in enumerate(weights):
                        started = time.perf_counter()
                        linear(x, weight)
                        times[index].append(time.perf_counter() - started)
                cells.append(f"{rows}: " + "/".join(f"{1e3 * statistics.median(t):.2f}" for t in times))
            print(name, "dense/" + "/".join(f"p{hint}" for hint in HINTS), " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
