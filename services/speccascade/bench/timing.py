"""Timing streamed responses as a client sees them, and the percentiles the served benchmarks report."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


@dataclass
class StreamTiming:
    ttft_s: float
    token_gaps_s: list[float]  # per token after the first chunk: chunk gap / tokens in the chunk
    tokens: int
    wall_s: float
    rounds: int = 0
    wire_bytes: int = 0
    context_bytes: int = 0


def time_stream(chunks) -> StreamTiming:
    """Consume a stream of chunks (objects with `token_ids`) and time it."""
    started = time.perf_counter()
    first = previous = None
    gaps: list[float] = []
    tokens = 0
    last = None
    for chunk in chunks:
        now = time.perf_counter()
        count = len(chunk.token_ids)
        if count:
            if first is None:
                first = now
            else:
                gaps += [(now - previous) / count] * count
            previous = now
            tokens += count
        last = chunk
    end = time.perf_counter()
    timing = StreamTiming(ttft_s=(first or end) - started, token_gaps_s=gaps, tokens=tokens, wall_s=end - started)
    stats = getattr(last, "stats", None)
    if stats is not None and hasattr(stats, "wire_bytes"):
        timing.rounds, timing.wire_bytes, timing.context_bytes = stats.rounds, stats.wire_bytes, stats.context_bytes
    return timing


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class LatencySummary:
    ttft_p50_ms: float
    token_p50_ms: float
    token_p95_ms: float
    tokens_per_s: float

    @classmethod
    def of(cls, timings: list[StreamTiming]) -> "LatencySummary":
        gaps = [g for t in timings for g in t.token_gaps_s]
        return cls(
            ttft_p50_ms=1000 * statistics.median(t.ttft_s for t in timings),
            token_p50_ms=1000 * percentile(gaps, 0.5), token_p95_ms=1000 * percentile(gaps, 0.95),
            tokens_per_s=sum(t.tokens for t in timings) / sum(t.wall_s for t in timings),
        )
