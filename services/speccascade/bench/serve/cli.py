"""`speccascade bench serve`: the served system over gRPC against the in-process engine, same
pair, same rule, same requests, in one run.

The in-process engine and the served application are loaded side by side and each request runs
on both, prompt by prompt (in-process, served, in-process, served, ...; greedy and sampled with a
fixed seed), so the machine's drift hits both alike. Prints: per-token latency and time to first
token, served / in-process, per request with its spread; how many outputs were identical token
for token; aggregate tokens/s at 1, 4 and 8 concurrent streams (with the tiers' mean batch size);
bytes on the wire per round. Holds the real pair twice (~8 GiB): run it under the shared lock,
`flock /tmp/speccascade-real-model.lock speccascade bench serve`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..timing import LatencySummary, StreamTiming, percentile, time_stream
from ..workload import TASKS


@dataclass
class ConcurrencyResult:
    streams: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    mean_drafter_batch: float
    mean_expert_batch: float


@dataclass
class WireBytes:
    sampling: str
    rounds: int
    bytes_per_round: float
    bytes_per_round_without_context: float


# Sampling modes and what the drafter ships for them (see tiers/wire.py).
WIRE_MODES = {
    "greedy (ids + max q)": dict(temperature=0.0),
    "top-p 0.95, T=0.7 (sparse rows)": dict(temperature=0.7, top_p=0.95),
    "T=1.0 (full float16 rows)": dict(temperature=1.0),
}


@dataclass
class PairedRequest:
    """One request run in-process and served, back to back."""

    task: str
    sampling: str
    in_process_token_p50_ms: float
    served_token_p50_ms: float
    in_process_ttft_ms: float
    served_ttft_ms: float
    identical: bool

    @property
    def token_ratio(self) -> float:
        return self.served_token_p50_ms / self.in_process_token_p50_ms

    @property
    def ttft_ratio(self) -> float:
        return self.served_ttft_ms / self.in_process_ttft_ms


# What each request is run with besides its rule (both sides get the same seed).
PAIRED_SAMPLINGS = {"greedy": dict(temperature=0.0), "T=0.7, top-p 0.95": dict(temperature=0.7, top_p=0.95)}


@dataclass
class Report:
    rule: str
    alpha: float
    block_size: int
    max_new_tokens: int
    dtype: str
    paired: list[PairedRequest] = field(default_factory=list)
    in_process: LatencySummary | None = None
    served: LatencySummary | None = None
    concurrency: list[ConcurrencyResult] = field(default_factory=list)
    wire_bytes_per_round: float = 0.0
    wire_bytes_per_round_without_context: float = 0.0
    wire_by_sampling: list[WireBytes] = field(default_factory=list)


def batch_means(handles) -> dict[str, tuple[int, int]]:
    return {name: (s["batches"], s["batched_requests"])
            for name, s in ((n, h.batch_stats.remote().result()) for n, h in handles.items())}


def run_paired(engine, client, tasks, args, report: Report, advance: Callable[[], None]) -> None:
    """Each request in-process then served, prompt by prompt; latency ratios and identical outputs."""
    from ...api.client import build_request
    from ...engine.request import GenerationRequest
    from ...options import SamplingParams

    in_process_timings, served_timings = [], []
    for task in tasks:
        for label, sampling in PAIRED_SAMPLINGS.items():
            options = dict(messages=[{"role": "user", "content": task}], rule=args.rule, alpha=args.alpha,
                           block_size=args.block_size, max_new_tokens=args.max_new_tokens, seed=0)
            local_chunks: list = []
            local = time_stream(_collect(engine.stream(GenerationRequest(**options, sampling=SamplingParams(**sampling))),
                                         local_chunks))
            remote_chunks: list = []
            remote = time_stream(_collect(client.stream(build_request(**options, **sampling)), remote_chunks))
            identical = ([t for c in local_chunks for t in c.token_ids]
                         == [t for c in remote_chunks for t in c.token_ids])
            in_process_timings.append(local)
            served_timings.append(remote)
            report.paired.append(PairedRequest(
                task, label, 1000 * percentile(local.token_gaps_s, 0.5), 1000 * percentile(remote.token_gaps_s, 0.5),
                1000 * local.ttft_s, 1000 * remote.ttft_s, identical))
            advance()
    report.in_process = LatencySummary.of(in_process_timings)
    report.served = LatencySummary.of(served_timings)


def _collect(chunks, into: list):
    for chunk in chunks:
        into.append(chunk)
        yield chunk


def run_served(args, tasks, report: Report) -> None:
    from ray import serve
    from rich.console import Console

    from ...api.client import SpecCascadeClient, build_request
    from ...app.launcher import ServeOverrides, start_serve_config
    from ...engine.engine import CascadeEngine

    launched = start_serve_config(args.config, ServeOverrides(drafter=args.drafter, expert=args.expert,
                                                              dtype=args.dtype),
                                  grpc_port=args.grpc_port, http_port=args.http_port)
    endpoints = launched.endpoints
    handles = {name: serve.get_deployment_handle(name, app_name=endpoints.app_name) for name in ("Drafter", "Expert")}
    target = endpoints.grpc_target

    def request(task, n):
        return build_request(messages=[{"role": "user", "content": task}], rule=args.rule, alpha=args.alpha,
                             block_size=args.block_size, max_new_tokens=n, temperature=0.0, seed=0)

    from rich.progress import Progress

    steps = (0 if args.skip_in_process else len(tasks) * len(PAIRED_SAMPLINGS)) + len(tasks) + len(args.streams)
    progress = Progress(console=Console(stderr=True), transient=False)
    bar = progress.add_task("bench serve (paired, then served alone, then concurrent streams)", total=steps)
    advance = lambda: progress.advance(bar)  # noqa: E731
    progress.start()
    try:
        engine = None
        if not args.skip_in_process:
            engine = CascadeEngine.load(args.drafter, args.expert, dtype=args.dtype, device="cpu")
        with SpecCascadeClient(target, application=endpoints.app_name) as client:
            client.generate(request(tasks[0], 4))  # warm-up
            if engine is not None:
                from ...engine.request import GenerationRequest

                engine.generate(GenerationRequest(messages=[{"role": "user", "content": tasks[0]}],
                                                  max_new_tokens=4))
                run_paired(engine, client, tasks, args, report, advance)
            timings = []
            for task in tasks:
                timings.append(time_stream(client.stream(request(task, args.max_new_tokens))))
                advance()
        engine = None
        if report.served is None:
            report.served = LatencySummary.of(timings)
        rounds = sum(t.rounds for t in timings)
        report.wire_bytes_per_round = sum(t.wire_bytes for t in timings) / rounds
        report.wire_bytes_per_round_without_context = sum(t.wire_bytes - t.context_bytes for t in timings) / rounds

        with SpecCascadeClient(target, application=endpoints.app_name) as client:
            for mode, sampling in WIRE_MODES.items():
                final = list(client.stream(build_request(
                    messages=[{"role": "user", "content": tasks[0]}], rule=args.rule, alpha=args.alpha,
                    block_size=args.block_size, max_new_tokens=16, seed=0, **sampling)))[-1].stats
                report.wire_by_sampling.append(WireBytes(
                    mode, final.rounds, final.wire_bytes / final.rounds,
                    (final.wire_bytes - final.context_bytes) / final.rounds))

        for streams in args.streams:
            before = batch_means(handles)
            results: list[StreamTiming] = []
            lock = threading.Lock()

            def one(i):
                with SpecCascadeClient(target, application=endpoints.app_name) as c:
                    timing = time_stream(c.stream(request(TASKS[i % len(TASKS)], args.max_new_tokens)))
                with lock:
                    results.append(timing)

            started = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
            after = batch_means(handles)
            means = {}
            for name in handles:
                batches = after[name][0] - before[name][0]
                means[name] = (after[name][1] - before[name][1]) / batches if batches else 0.0
            tokens = sum(r.tokens for r in results)
            report.concurrency.append(ConcurrencyResult(streams, tokens, wall, tokens / wall,
                                                        means["Drafter"], means["Expert"]))
            advance()
    finally:
        progress.stop()
        launched.stack.stop()


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]bench serve[/]: {report.rule}(alpha={report.alpha:g}, gamma={report.block_size}), "
                  f"greedy, {report.max_new_tokens} new tokens, {report.dtype}")
    if report.paired:
        paired = Table(title="each request in-process, then served (interleaved): served / in-process")
        for column in ("request", "sampling", "per-token p50 ms (in / served)", "ratio", "TTFT ratio", "identical"):
            paired.add_column(column, justify="right")
        for p in report.paired:
            paired.add_row(p.task[:40], p.sampling, f"{p.in_process_token_p50_ms:.0f} / {p.served_token_p50_ms:.0f}",
                           f"{p.token_ratio:.2f}", f"{p.ttft_ratio:.2f}", "yes" if p.identical else "NO")
        console.print(paired)
        ratios = sorted(p.token_ratio for p in report.paired)
        ttft = sorted(p.ttft_ratio for p in report.paired)
        console.print(f"per-token latency served / in-process: median {statistics.median(ratios):.2f} "
                      f"[{ratios[0]:.2f}-{ratios[-1]:.2f}] over {len(ratios)} requests; TTFT median "
                      f"{statistics.median(ttft):.2f} [{ttft[0]:.2f}-{ttft[-1]:.2f}]; identical outputs "
                      f"{sum(p.identical for p in report.paired)}/{len(report.paired)}")
    latency = Table(title="one stream: in-process vs served over gRPC (all paired requests)")
    for column in ("", "TTFT p50 ms", "per-token p50 ms", "per-token p95 ms", "tokens/s"):
        latency.add_column(column, justify="right")
    rows = [("in-process", report.in_process), ("served (gRPC)", report.served)]
    for name, summary in rows:
        if summary:
            latency.add_row(name, f"{summary.ttft_p50_ms:.0f}", f"{summary.token_p50_ms:.0f}",
                            f"{summary.token_p95_ms:.0f}", f"{summary.tokens_per_s:.2f}")
    if report.in_process and report.served:
        a, b = report.in_process, report.served
        latency.add_row("overhead", f"{b.ttft_p50_ms / a.ttft_p50_ms - 1:+.0%}", f"{b.token_p50_ms / a.token_p50_ms - 1:+.0%}",
                        f"{b.token_p95_ms / a.token_p95_ms - 1:+.0%}", f"{b.tokens_per_s / a.tokens_per_s - 1:+.0%}")
    console.print(latency)
    if report.concurrency:
        table = Table(title="aggregate throughput (served)")
        for column in ("streams", "tokens", "wall s", "tokens/s", "x vs 1", "drafter batch", "expert batch"):
            table.add_column(column, justify="right")
        base = report.concurrency[0].tokens_per_s
        for c in report.concurrency:
            table.add_row(str(c.streams), str(c.tokens), f"{c.wall_s:.1f}", f"{c.tokens_per_s:.2f}",
                          f"{c.tokens_per_s / base:.2f}", f"{c.mean_drafter_batch:.2f}", f"{c.mean_expert_batch:.2f}")
        console.print(table)
    console.print(f"bytes on the wire per round: {report.wire_bytes_per_round:,.0f} "
                  f"({report.wire_bytes_per_round_without_context:,.0f} without the resent context)")
    if report.wire_by_sampling:
        table = Table(title="bytes on the wire per round, by sampling (16 tokens, first prompt)")
        for column in ("sampling", "rounds", "bytes/round", "without resent context"):
            table.add_column(column, justify="right")
        for w in report.wire_by_sampling:
            table.add_row(w.sampling, str(w.rounds), f"{w.bytes_per_round:,.0f}", f"{w.bytes_per_round_without_context:,.0f}")
        console.print(table)


def run(args: argparse.Namespace) -> int:
    tasks = TASKS[: args.prompts]
    report = Report(args.rule, args.alpha, args.block_size, args.max_new_tokens, args.dtype)
    run_served(args, tasks, report)
    print_report(report)
    if args.json:
        data = asdict(report)
        for entry, paired in zip(data["paired"], report.paired):
            entry.update(token_ratio=paired.token_ratio, ttft_ratio=paired.ttft_ratio)
        args.json.write_text(json.dumps(data, indent=2))
    return 0


def register(benches) -> None:
    from pathlib import Path

    from ...config.app import DTYPE_NAMES

    parser = benches.add_parser("serve", help="served (gRPC) vs in-process latency, throughput at 1/4/8 streams")
    parser.add_argument("--drafter", help="drafter model source (default: the packaged pair)")
    parser.add_argument("--expert", help="expert model source")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    parser.add_argument("--config", type=Path, help="Serve config (default: deploy/local-cpu.yaml)")
    parser.add_argument("--rule", default="token")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--block-size", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=3,
                        help="prompts for the paired comparison (each greedy and sampled)")
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    parser.add_argument("--grpc-port", type=int, default=9411)
    parser.add_argument("--http-port", type=int, default=8411)
    parser.add_argument("--skip-in-process", action="store_true", help="served figures only (half the memory)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.set_defaults(handler=run)
