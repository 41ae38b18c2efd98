"""CUDA graphs of the static backend's step: a fixed set of shapes, captured once at start-up
within a memory budget, replayed by the step that fits.

A shape is (rows, tokens per row, attended window), each from a short list of buckets:

- rows: powers of two up to the tier's largest batch (a batch of 5 runs as 8 rows; the 3 padding
  rows write only to the scratch position);
- tokens: 1 (a drafter step), 2 (a drafter catching up on a bonus token), 4, 8 and 17 (the verify
  of a block of up to 16): a row with fewer tokens is left-padded;
- window: 256, 512, 1024, 1536, 2048, 3072, 4096, ... up to the slots' capacity. Attending over
  twice the keys costs a 7B batch-8 step a third more on an H100 (the design brief's GPU measurements), so windows
  grow by 1.5x-2x, not 128 at a time: few graphs, little waste.

Every graph writes its probabilities into one shared output buffer sized for the largest shape,
and all graphs draw their temporaries from one memory pool (they never run at once: one forward
thread per replica), so the graphs cost the pool's size plus the buffer, not one of each per
graph. Shapes are captured smallest first until the budget is reached; a step whose shape was not
captured runs eagerly (the log says which shapes were captured and the memory they took).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

TOKEN_BUCKETS = (1, 2, 4, 8, 17)  # 17: the verify of a block of 16, the largest block captured
FIRST_WINDOW = 256
WARMUP_STEPS = 2  # eager runs on a side stream before each capture (lazy inits, allocator warm-up)
MIB = 1 << 20


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """Powers of two up to the first one >= max_rows."""
    buckets = [1]
    while buckets[-1] < max_rows:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def window_buckets(capacity: int) -> tuple[int, ...]:
    """256, 512, 1024, 1536, 2048, 3072, 4096, 6144, ... below `capacity`, then `capacity` itself."""
    windows, power = [], FIRST_WINDOW
    while True:
        for size in (power, power * 3 // 2) if power >= 1024 else (power,):
            if size >= capacity:
                return (*windows, capacity)
            windows.append(size)
        power *= 2


def bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= value, or None past the last."""
    return next((b for b in buckets if b >= value), None)


@dataclass(frozen=True)
class Shape:
    rows: int
    tokens: int
    window: int

    @property
    def cells(self) -> int:
        return self.rows * self.tokens


def planned_shapes(max_rows: int, capacity: int) -> list[Shape]:
    """Every shape worth capturing, cheapest first (what a budget cuts off is what runs least)."""
    shapes = [Shape(r, t, w) for w in window_buckets(capacity) for r in row_buckets(max_rows) for t in TOKEN_BUCKETS]
    return sorted(shapes, key=lambda s: (s.window, s.rows * s.tokens, s.rows))


class _Graph:
    def __init__(self, ids: Tensor, positions: Tensor, slots: Tensor, graph):
        self.ids, self.positions, self.slots, self.graph = ids, positions, slots, graph


class GraphSet:
    """The captured graphs of one step function, keyed by shape.

    `step(ids, positions, slots, window, out)` is the eager step: it runs the model on `ids`
    ([rows, tokens]) at `positions` for the sessions in `slots` ([rows]) over `window` keys and
    writes the probabilities of every position into `out[:rows, :tokens]`."""

    def __init__(self, step: Callable[[Tensor, Tensor, Tensor, int, Tensor], None], *, device: torch.device,
                 max_rows: int, capacity: int, vocab: int, scratch: int, memory_budget_mb: int):
        self.step, self.device, self.scratch = step, device, scratch
        self.rows = row_buckets(max_rows)
        self.windows = window_buckets(capacity)
        largest = Shape(self.rows[-1], TOKEN_BUCKETS[-1], capacity)
        self.out = torch.empty(largest.rows, largest.tokens, vocab, dtype=torch.float32, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[Shape, _Graph] = {}
        self.pool_bytes = 0
        self.budget_mb = memory_budget_mb
        self.skipped: list[Shape] = []  # shapes left out by the memory budget
        self._capture_all(planned_shapes(max_rows, capacity), memory_budget_mb * MIB)

    def shape_for(self, rows: int, tokens: int, window: int) -> Shape | None:
        """The captured shape a step of this size replays, if any."""
        r, t, w = self.bucketed(rows, tokens, window)
        if r is None or t is None or w is None:
            return None
        shape = Shape(r, t, w)
        return shape if shape in self.graphs else None

    def bucketed(self, rows: int, tokens: int, window: int) -> tuple[int | None, int | None, int | None]:
        """The buckets a step of this size falls in (None: past the last)."""
        return bucket(rows, self.rows), bucket(tokens, TOKEN_BUCKETS), bucket(window, self.windows)

    def why_not(self, bucketed: tuple[int | None, int | None, int | None]) -> str:
        """Why a step in these buckets has no graph (`shape_for` found none)."""
        rows, tokens, window = bucketed
        if rows is None:
            return f"more rows than the {self.rows[-1]} captured: raise static.slots or lower max_batch_size"
        if tokens is None:
            return f"more tokens a row than the {TOKEN_BUCKETS[-1]} captured"
        if window is None:
            return f"a window past the slots' capacity of {self.windows[-1]}"
        return (f"shape {Shape(rows, tokens, window)} not captured: {len(self.skipped)} shapes were over the graph "
                f"memory budget of {self.budget_mb} MiB (static.graph_memory_mb)")

    def replay(self, shape: Shape, ids: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
        """Run the captured step on inputs already padded to `shape`; the probabilities
        [rows, tokens, V] are a view of the shared buffer, valid until the next replay."""
        graph = self.graphs[shape]
        graph.ids.copy_(ids, non_blocking=True)
        graph.positions.copy_(positions, non_blocking=True)
        graph.slots.copy_(slots, non_blocking=True)
        graph.graph.replay()
        return self.out[: shape.rows, : shape.tokens]

    @torch.no_grad()
    def _capture_all(self, shapes: list[Shape], budget: int) -> None:
        before = torch.cuda.memory_reserved(self.device)
        warmup = torch.cuda.Stream(device=self.device)  # one side stream for every shape's warm-up
        for shape in shapes:
            if torch.cuda.memory_reserved(self.device) - before > budget:
                self.skipped.append(shape)
                continue
            self.graphs[shape] = self._capture(shape, warmup)
        torch.cuda.synchronize(self.device)
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - before
        out_mib = self.out.numel() * self.out.element_size() / MIB
        log.info("static backend: captured %d CUDA graphs (rows %s x tokens %s x windows %s) in %.0f MiB of pool "
                 "and a %.0f MiB output buffer (budget %.0f MiB)%s", len(self.graphs), list(self.rows),
                 list(TOKEN_BUCKETS), list(self.windows), self.pool_bytes / MIB, out_mib, budget / MIB,
                 f"; {len(self.skipped)} shapes over budget run eagerly, the smallest {self.skipped[0]}" if self.skipped
                 else "")

    def _capture(self, shape: Shape, side: torch.cuda.Stream) -> _Graph:
        # Warm-up and capture write only to the scratch position, so no session's keys change.
        ids = torch.zeros((shape.rows, shape.tokens), dtype=torch.long, device=self.device)
        positions = torch.full((shape.rows, shape.tokens), self.scratch, dtype=torch.long, device=self.device)
        slots = torch.zeros(shape.rows, dtype=torch.long, device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step(ids, positions, slots, shape.window, self.out)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step(ids, positions, slots, shape.window, self.out)
        return _Graph(ids, positions, slots, graph)
