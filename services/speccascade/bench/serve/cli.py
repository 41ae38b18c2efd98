"""`speccascade bench serve`: the served system over gRPC against the in-process engine, same pair,
same rule, same requests, in one run.

1. Paired: each request in-process, then served, request by request (in-process, served,
   in-process, ...; in each `--sampling` mode, with a fixed seed), so the machine's drift hits both
   alike: per-token latency and time to first token served / in-process, with their spread, by
   sampling mode too; how many outputs were identical token for token.
2. Where a round's time goes, in-process and served: drafter queueing / forward passes / choosing
   tokens, expert queueing / forward passes / verification, the tier calls (through Serve or the
   direct channel) and (de)serialisation, and the router's loop itself, read from every request's
   own stats.
3. Aggregate throughput at 1, 8 and 32 concurrent streams (each sending --requests-per-stream
   requests one after the other), with the tiers' mean batch sizes and the same split.
4. With --load-streams: a guidellm-style load (that many streams of --load-prompt-tokens-token
   prompts), against the same prompts one at a time: TTFT and inter-token latency, and whether
   every request finished.
5. Bytes on the wire per round, by sampling mode.
6. With --pipeline on,off(,auto): each request served in every pipelining mode, mode after mode:
   per-token latency without pipelining / with it, identical outputs, pre-drafts made and used,
   drafter steps wasted; and the throughput at each concurrency in every mode. `--pin-tiers` puts
   each tier on a core of its own, so drafting ahead can overlap verification on a small machine.

`--tiny` runs a tiny random pair with Qwen2.5's vocabulary (2 layers, hidden 64, fp32), where the
models cost little and what remains is the serving path; `--shapes qwen2.5-0.5b,qwen2.5-7b`
random-weight models of real shapes (on a GPU, with `--config deploy/gpu-single.yaml`: docs/gpu.md).
The packaged pair (the default) takes about 8 GiB twice (in-process and served): the benchmark holds
the machine's real-model lock (`bench.machine`) while it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..workload import TASKS
from .measure import Breakdown, Concurrency, Load, Paired, PipelinedRequest
from .report import print_report

# Sampling modes of the paired comparison (`--sampling`): name -> (label, options). `unfiltered` is
# the OpenAI API's default (temperature 1, no top-p): its rounds carry whole float16 rows (a trained
# model's as their non-zero values).
PAIRED_SAMPLINGS = {
    "greedy": ("greedy", dict(temperature=0.0)),
    "nucleus": ("T=0.7, top-p 0.95", dict(temperature=0.7, top_p=0.95)),
    "unfiltered": ("T=1.0, unfiltered", dict(temperature=1.0)),
}
# Sampling modes and what the drafter ships for them (engine/blocks.py).
WIRE_MODES = {
    "greedy (ids + max q)": dict(temperature=0.0),
    "top-p 0.95, T=0.7 (sparse rows)": dict(temperature=0.7, top_p=0.95),
    "T=1.0 (float16 rows: dense, or their non-zeros)": dict(temperature=1.0),
}


@dataclass
class Report:
    pair: str
    rule: str
    alpha: float
    block_size: int
    max_new_tokens: int
    dtype: str
    tiers: str = ""  # how the tiers share the machine's cores
    phase: str = "starting"  # what the bench was doing last (where a stopped bench stopped)
    paired: list[Paired] = field(default_factory=list)
    breakdowns: dict[str, Breakdown] = field(default_factory=dict)  # in-process / served, paired requests
    concurrency: list[Concurrency] = field(default_factory=list)
    pipelined: list[PipelinedRequest] = field(default_factory=list)
    load: Load | None = None
    wire: dict[str, tuple[int, float]] = field(default_factory=dict)  # mode -> (rounds, bytes per round)


def tiny_pair(root: Path, tokenizer: str | None) -> tuple[str, str]:
    from ..tiny import qwen_tokenizer, save_pair

    return save_pair(root, qwen_tokenizer(tokenizer), hidden=64, layers=(2, 2), drafter_noise=0.1)


def shaped_pair(root: Path, shapes: str, tokenizer: str | None) -> tuple[str, str]:
    from ..tiny import qwen_tokenizer, save_shaped_pair

    drafter, _, expert = shapes.partition(",")
    return save_shaped_pair(root, qwen_tokenizer(tokenizer), drafter, expert)


def run(args: argparse.Namespace) -> int:
    from ..machine import real_model_lock

    if args.tiny and args.shapes:
        raise ValueError(f"--tiny and --shapes={args.shapes!r} each choose the pair: give one")
    if args.shapes_dir is not None and not args.shapes:
        raise ValueError(f"--shapes-dir={str(args.shapes_dir)!r} keeps the models of --shapes, which was not given")

    report = Report("tiny random, Qwen2.5 vocabulary (2 layers, hidden 64)" if args.tiny else
                    f"random weights, shapes {args.shapes}" if args.shapes else
                    f"{args.drafter or 'packaged 0.5B'} / {args.expert or 'packaged 1.5B'}",
                    args.rule, args.alpha, args.block_size, args.max_new_tokens, args.dtype)
    complete = False
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # `timeout` or a job runner: keep what was measured
    try:
        with contextlib.ExitStack() as stack:
            try:
                report.phase = "making the models" if args.tiny or args.shapes else "waiting for the real-model lock"
                if args.tiny:
                    args.drafter, args.expert = tiny_pair(Path(stack.enter_context(tempfile.TemporaryDirectory())),
                                                          args.tokenizer)
                    args.dtype = report.dtype = "fp32"
                elif args.shapes:
                    root = args.shapes_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
                    args.drafter, args.expert = shaped_pair(root, args.shapes, args.tokenizer)
                else:
                    stack.enter_context(real_model_lock())
                measure_all(args, report, stack)
                complete, report.phase = True, "done"
            finally:
                # Before the cluster stops (`stack`): Serve's shutdown can outlast the grace a kill gives after
                # its SIGTERM (`timeout --kill-after`), and what was measured must not go with it.
                publish_report(report, args.json, complete)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def publish_report(report: Report, json_path: Path | None, complete: bool) -> None:
    """Write the figures to `json_path` and print them; `complete` says whether every measurement ran.
    The file first and the print flushed: a process killed soon after keeps both."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(report)
        data["complete"] = complete
        data["paired_ratios"] = [{"token": p.token_ratio, "ttft": p.ttft_ratio} for p in report.paired]
        data["breakdown_ms_per_round"] = {k: b.per_round() for k, b in report.breakdowns.items()}
        partial = json_path.with_name(json_path.name + ".partial")  # a kill mid-write leaves no half a file
        partial.write_text(json.dumps(data, indent=2) + "\n")
        partial.replace(json_path)
    if not complete:
        print(f"bench serve stopped before the end, while {report.phase}: what follows is what it measured until "
              "then", file=sys.stderr)
    print_report(report)
    sys.stdout.flush()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: the figures so far are printed and written, then the cluster stops


def tier_settings(args: argparse.Namespace) -> dict[str, dict]:
    """What the command line sets in both tiers: a core each (--pin-tiers, where the tiers' passes
    need not take turns), or the lock their passes take turns on (--cpu-lock-file)."""
    settings: dict[str, dict] = {"drafter": {}, "expert": {}}
    if args.pin_tiers:
        for core, tier in enumerate(settings):
            settings[tier].update(cpu_affinity=[core], torch_threads=1, cpu_lock_file=None)
    if args.cpu_lock_file is not None:
        for tier in settings.values():
            tier["cpu_lock_file"] = None if args.cpu_lock_file == "none" else args.cpu_lock_file
    return settings


def describe_tiers(config, replica_stats: dict[str, dict]) -> str:
    """How the tiers run: device, threads, cores, the C allocator, CPU kernel cache and OpenMP spin
    each replica reports (its `batch_stats`), turns, and how the router's calls reach them."""
    drafter, expert = config.drafter, config.expert

    def kernels(entries: int) -> str:
        return "default CPU kernel cache" if entries < 0 else f"CPU kernel cache {entries}"

    def spin(iterations: int) -> str:
        return "default OpenMP spin" if iterations < 0 else f"OpenMP spin {iterations:,}"

    cores = "; ".join(f"{name} {tier.device}, {tier.torch_threads or 'default'} threads"
                      + (f" on cores {tier.cpu_affinity}" if tier.cpu_affinity else "")
                      + f", {replica_stats[name]['allocator']} allocator, {kernels(replica_stats[name]['kernel_cache'])}"
                      + f", {spin(replica_stats[name]['cpu_spin'])}"
                      for name, tier in (("drafter", drafter), ("expert", expert)))
    turns = {drafter.cpu_lock_file, expert.cpu_lock_file} - {None}
    return (cores + (f"; passes take turns on {', '.join(sorted(turns))}" if turns else "; passes may run at once")
            + f"; tier calls over {config.router.tier_transport}")


def measure_all(args: argparse.Namespace, report: Report, stack: contextlib.ExitStack) -> None:
    """Start the application and measure into `report`; the cluster stops when `stack` closes."""
    from ray import serve
    from rich.console import Console
    from rich.progress import Progress

    from ...api.client import SpecCascadeClient, build_request
    from ...app.launcher import ServeOverrides, start_serve_config
    from ...commands.serve import tier_process_overrides
    from ...engine.engine import CascadeEngine
    from ...engine.request import GenerationRequest
    from . import measure

    tasks = TASKS[: args.prompts]
    report.phase = "starting the application"
    launched = start_serve_config(args.config, ServeOverrides(drafter=args.drafter, expert=args.expert,
                                                              dtype=args.dtype, backend=args.backend,
                                                              device=None if args.device == "cpu" else args.device,
                                                              tier_settings=tier_settings(args),
                                                              tier_transport=args.tier_transport,
                                                              **tier_process_overrides(args)),
                                  grpc_port=args.grpc_port, http_port=args.http_port, stop_with=stack)
    target, app = launched.endpoints.grpc_target, launched.endpoints.app_name
    handles = {name: serve.get_deployment_handle(name, app_name=app) for name in ("Drafter", "Expert")}
    report.tiers = describe_tiers(launched.config, {name.lower(): handle.batch_stats.remote().result()
                                                    for name, handle in handles.items()})
    policy = dict(rule=args.rule, alpha=args.alpha, block_size=args.block_size)

    def chat(task: str, n: int, **sampling) -> dict:
        return dict(messages=[{"role": "user", "content": task}], **policy, max_new_tokens=n, seed=0, **sampling)

    modes = args.pipeline or ["off"]  # served vs in-process compares the serving path itself: no pipelining
    requests = [(task, label, chat(task, args.max_new_tokens, **sampling))
                for task in tasks for label, sampling in (PAIRED_SAMPLINGS[name] for name in args.sampling)]

    steps = (0 if args.skip_in_process else len(requests)) + (len(requests) if args.pipeline else 0) + \
        len(args.streams) * len(modes) + (2 if args.load_streams else 0) + 1
    progress = Progress(console=Console(stderr=True), transient=False)
    bar = progress.add_task("bench serve", total=steps)
    progress.start()

    def enter_phase(phase: str) -> None:
        report.phase = phase
        progress.update(bar, description=f"bench serve: {phase}")

    try:
        with SpecCascadeClient(target, application=app) as client:
            enter_phase("warming up")
            client.generate(build_request(**chat(tasks[0], 4)))  # warm-up: both tiers loaded and compiled
            if not args.skip_in_process:
                enter_phase("in-process vs served, request by request")
                engine = CascadeEngine.load(args.drafter, args.expert, dtype=args.dtype, device=args.device,
                                            backend=args.backend or "hf", progress=False)
                engine.generate(GenerationRequest(**chat(tasks[0], 4)))
                report.breakdowns = {"in-process": Breakdown(), "served": Breakdown()}
                unpipelined = [(task, label, {**options, "pipeline": "off"}) for task, label, options in requests]
                measure.run_paired(engine, client, unpipelined, lambda: progress.advance(bar), report.breakdowns,
                                   handles, report.paired)
                del engine
            if args.pipeline:
                enter_phase(f"pipelining {', '.join(args.pipeline)}, request by request")
                measure.run_pipelined(client, requests, args.pipeline, lambda: progress.advance(bar), report.pipelined)
            enter_phase("bytes on the wire")
            for mode, sampling in WIRE_MODES.items():
                stats = measure.Timed(client.stream(build_request(**chat(tasks[0], 16, **sampling)))).stats
                report.wire[mode] = (stats.rounds, stats.wire_bytes / max(stats.rounds, 1))
            progress.advance(bar)
        for streams in args.streams:
            for mode in modes:  # modes alternate at each concurrency, so the machine's drift hits all alike
                enter_phase(f"{streams} concurrent streams, pipelining {mode}")
                report.concurrency.append(measure.concurrent(
                    target, app, lambda i: build_request(**chat(TASKS[i % len(TASKS)], args.max_new_tokens),
                                                         pipeline=mode), streams, handles, mode,
                    args.requests_per_stream))
                progress.advance(bar)
        if args.load_streams:
            from transformers import AutoTokenizer

            from ...models import DRAFTER_DEFAULT, resolve_model

            tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.drafter or DRAFTER_DEFAULT,
                                                                    progress=False).path)
            prompts = [measure.synthetic_prompt(tokenizer, args.load_prompt_tokens, seed) for seed in
                       range(args.load_requests)]
            enter_phase("load prompts one at a time (baseline)")
            baseline = measure.load(target, app, prompts[: max(2, args.load_requests // args.load_streams)],
                                    streams=1, max_new_tokens=args.load_max_new_tokens, timeout_s=args.load_timeout_s)
            progress.advance(bar)
            enter_phase(f"load, {args.load_streams} streams")
            finished, ttfts, gaps = measure.load(target, app, prompts, streams=args.load_streams,
                                                 max_new_tokens=args.load_max_new_tokens, timeout_s=args.load_timeout_s)
            report.load = Load(args.load_streams, args.load_prompt_tokens, len(prompts), finished, ttfts, gaps,
                               baseline[1], baseline[2])
            progress.advance(bar)
    finally:
        progress.stop()


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _samplings(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PAIRED_SAMPLINGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown sampling mode(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(PAIRED_SAMPLINGS)}")
    return names


def register(benches) -> None:
    from typing import get_args

    from ...commands.serve import add_tier_process_arguments, positive_int
    from ...config.app import DTYPE_NAMES, TierTransport

    parser = benches.add_parser("serve", help="served (gRPC) vs in-process per request, where a round's time goes, "
                                              "throughput at 1/8/32 streams, a load of long prompts")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random pair with Qwen2.5's vocabulary: what remains is the serving path")
    parser.add_argument("--shapes", help="random-weight models of these shapes, e.g. qwen2.5-0.5b,qwen2.5-7b (a GPU "
                                         "machine where real weights cannot travel)")
    parser.add_argument("--shapes-dir", type=Path,
                        help="with --shapes: keep the random-weight models in this directory and use them again in "
                             "later runs (a 7B takes ~15 GB; default: a temporary directory, removed at the end)")
    parser.add_argument("--tokenizer", help="directory of the Qwen2.5 tokenizer for --tiny/--shapes (default: the "
                                            "packaged drafter's)")
    parser.add_argument("--drafter", help="drafter model source (default: the packaged pair)")
    parser.add_argument("--expert", help="expert model source")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    parser.add_argument("--backend", default=None, help="both sides' backend (default: the config's; in-process hf)")
    parser.add_argument("--device", default="cpu", help="the in-process engine's device (and the tiers' when not cpu)")
    parser.add_argument("--config", type=Path, help="Serve config (default: deploy/local-cpu.yaml)")
    parser.add_argument("--rule", default="lossless")
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--block-size", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4, help="prompts of the paired comparison (each in every "
                                                              "--sampling mode)")
    parser.add_argument("--sampling", type=_samplings, default=["greedy", "nucleus"],
                        help=f"sampling modes of the paired comparison, of {', '.join(PAIRED_SAMPLINGS)} "
                             "(default greedy,nucleus; unfiltered: the OpenAI API's defaults, whole rows on the wire)")
    parser.add_argument("--streams", type=_int_list, default=[1, 8, 32], help="concurrent streams (default 1,8,32)")
    parser.add_argument("--requests-per-stream", type=positive_int, default=1,
                        help="requests each concurrent stream sends one after the other (default 1: a burst; more "
                             "weigh the burst's start and its stragglers' end less, as a steady load)")
    parser.add_argument("--load-streams", type=int, default=0, help="a load of this many concurrent streams")
    parser.add_argument("--load-prompt-tokens", type=int, default=128)
    parser.add_argument("--load-requests", type=int, default=16)
    parser.add_argument("--load-max-new-tokens", type=int, default=64)
    parser.add_argument("--load-timeout-s", type=float, default=600.0, help="a load request past this is not finished")
    parser.add_argument("--pipeline", type=lambda s: [m.strip() for m in s.split(",") if m.strip()], default=[],
                        help="pipelining modes to compare, served request by request and at each concurrency "
                             "(e.g. on,off,auto)")
    parser.add_argument("--pin-tiers", action="store_true",
                        help="the drafter on core 0 and the expert on core 1, one thread each (so they can overlap)")
    add_tier_process_arguments(parser)
    parser.add_argument("--cpu-lock-file", help="the file both tiers' forward passes take turns on (TierConfig."
                                                "cpu_lock_file; default: the config's), or 'none' for no turns")
    parser.add_argument("--tier-transport", choices=get_args(TierTransport),
                        help="how the router reaches the tiers (RouterConfig.tier_transport; default: the config's)")
    parser.add_argument("--grpc-port", type=int, default=9411)
    parser.add_argument("--http-port", type=int, default=8411)
    parser.add_argument("--skip-in-process", action="store_true", help="served figures only (half the memory)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.set_defaults(handler=run)


def median_ratio(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
