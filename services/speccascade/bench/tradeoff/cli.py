"""`speccascade bench tradeoff`: the quality–latency trade-off of every deferral rule and every
baseline on HumanEval, on one loaded drafter/expert pair.

For each configuration (method, alpha, sampling setting) and each problem: generate a completion,
run the problem's tests on it in a sandbox (pass@1), score it with the expert (mean log-likelihood
per token), and record latency and forward passes. Outputs in `--out`: `records.jsonl` (one line per
(configuration, problem); a rerun skips what is there), `calibration.jsonl` (the measured
drafter/expert step-cost ratio c, per invocation), `summary.jsonl`, `table.md` and one plot per
quality measure and sampling setting.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import uuid
from pathlib import Path

from ..humaneval import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_SECONDS, load_problems
from .configs import EXPERT, LOSSLESS, METHODS, SAMPLINGS, BenchConfig, build_configs, parse_alpha_overrides, parse_list
from .records import (
    BATCHED_RUNS_FILE,
    CALIBRATION_FILE,
    LATENCY_CHECK_FILE,
    RECORDS_FILE,
    SUMMARY_FILE,
    RecordStore,
    append_jsonl,
    read_jsonl,
)
from .report import (
    QUALITY_MEASURES,
    markdown_alpha_curves,
    markdown_batched,
    markdown_summary,
    markdown_table,
    plot_tradeoff,
    step_cost_from_records,
    summarize,
    summary_order,
    summary_records,
)

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("benchmarks/tradeoff/humaneval")
QUICK_OUT = Path("benchmarks/tradeoff/quick")
DEFAULT_MAX_NEW_TOKENS = 384  # the longest canonical HumanEval solution is ~300 Qwen tokens
QUICK_LIMIT = 3
QUICK_MAX_NEW_TOKENS = 64
QUICK_SAMPLINGS = ("greedy",)


def register(subparsers) -> None:
    from ...config.app import DTYPE_NAMES

    parser = subparsers.add_parser(
        "tradeoff", help="quality vs latency of every rule and baseline on HumanEval",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--drafter", default=None, help="drafter source (default: the packaged drafter)")
    parser.add_argument("--expert", default=None, help="expert source (default: the packaged expert)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output directory, resumable (default: {DEFAULT_OUT}, quick: {QUICK_OUT})")
    parser.add_argument("--limit", type=int, default=None, help="first N HumanEval problems (default: all 164)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    parser.add_argument("--samplings", default=",".join(SAMPLINGS), help=f"comma-separated sampling settings (default: all; quick: {','.join(QUICK_SAMPLINGS)})")
    parser.add_argument("--alphas", action="append", metavar="METHOD=A[,B...]",
                        help="replace one method's alpha sweep (repeatable), e.g. --alphas token=0.1,0.3")
    parser.add_argument("--block-size", type=int, default=5, help="gamma, also for hf-assisted (default: 5)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"token budget per completion (default {DEFAULT_MAX_NEW_TOKENS}, quick {QUICK_MAX_NEW_TOKENS})")
    parser.add_argument("--seed", type=int, default=1234, help="base seed; each problem gets its own (default: 1234)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help=f"seconds per test run (default: {DEFAULT_TIMEOUT_SECONDS:g})")
    parser.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB, help=f"address-space limit per test run (default: {DEFAULT_MEMORY_MB})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_LIMIT} problems, greedy, few alphas, {QUICK_MAX_NEW_TOKENS} tokens")
    parser.add_argument("--batch", type=int, default=None, metavar="N",
                        help="decode the engine configurations' problems N at a time through the pair, their "
                             "latency modelled as alone (hf-assisted still runs alone; default: every one alone)")
    parser.add_argument("--backend", default="hf", choices=("hf", "static"),
                        help="model execution (default hf); static keeps a slot per problem decoded at once, so a "
                             "batch copies no cache (hf lays each batch's caches out afresh)")
    parser.add_argument("--latency-sample", type=int, default=0, metavar="K",
                        help="with --batch: decode K batched problems alone again, configurations in turn, to "
                             "check the latency model (latency_check.jsonl)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild summary, table and plots (of the first --limit problems); load no model")
    parser.add_argument("--combine", action="append", type=Path, metavar="DIR",
                        help="with --report-only: the alpha curves of a sweep made by several invocations, one "
                             "directory each with its own expert-only reference (repeatable), into --out: "
                             "curves.md, the chosen alpha per rule and the plots")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    quick = args.quick
    limit = args.limit if args.limit is not None else (QUICK_LIMIT if quick else None)
    max_new_tokens = args.max_new_tokens or (QUICK_MAX_NEW_TOKENS if quick else DEFAULT_MAX_NEW_TOKENS)
    samplings = parse_list(args.samplings, tuple(SAMPLINGS), "sampling setting")
    if quick and args.samplings == ",".join(SAMPLINGS):
        samplings = QUICK_SAMPLINGS
    configs = build_configs(methods=parse_list(args.methods, METHODS, "method"), samplings=samplings,
                            quick=quick, block_size=args.block_size, max_new_tokens=max_new_tokens,
                            alphas=parse_alpha_overrides(args.alphas))
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch {args.batch}: give at least 1 (problems decoded at once)")
    if args.latency_sample and args.batch is None:
        raise ValueError("--latency-sample checks the latency model of a batched run: give --batch N too")
    if args.latency_sample < 0:
        raise ValueError(f"--latency-sample {args.latency_sample}: give 0 or more")
    if args.combine and not args.report_only:
        raise ValueError("--combine reports on sweeps already run: give --report-only too")
    problems = load_problems(limit)
    out: Path = args.out or (QUICK_OUT if quick else DEFAULT_OUT)
    if args.combine:
        print(write_combined_report(args.combine, out,
                                    task_ids={p.task_id for p in problems} if limit is not None else None))
        return 0
    if not args.report_only:
        from ...engine.engine import CascadeEngine

        print(f"loading the pair ({args.dtype}) ...", flush=True)
        engine = CascadeEngine.load(args.drafter, args.expert, dtype=args.dtype, backend=args.backend,
                                    static_slots=max(args.batch or 1, 2))
        run_benchmark(engine, configs, problems, out, base_seed=args.seed, timeout=args.timeout,
                      memory_mb=args.memory_mb, batch=args.batch, latency_sample=args.latency_sample)
    report = write_report(out, task_ids={p.task_id for p in problems} if limit is not None else None)
    print(report)
    return 0


def run_benchmark(engine, configs: list[BenchConfig], problems, out: Path, *, base_seed: int,
                  timeout: float = DEFAULT_TIMEOUT_SECONDS, memory_mb: int = DEFAULT_MEMORY_MB,
                  progress: bool = True, batch: int | None = None, latency_sample: int = 0) -> int:
    """Run every (configuration, problem) not yet in `out`; returns how many were run.

    Problem-major order: every configuration does a problem before the next problem starts, so a
    run stopped at any point compares all methods on the same problems, and slow drifts in machine
    load fall on all configurations alike. `batch`: the engine configurations' pairs decoded that
    many at a time (`batched.py`), in the same order."""
    from tqdm import tqdm

    from .run import describe_machine, measure_step_cost, problem_seed, run_one

    store = RecordStore(out)
    todo = [(i, p, c) for i, p in enumerate(problems) for c in configs if not store.has(c.key, p.task_id)]
    skipped = len(problems) * len(configs) - len(todo)
    if skipped:
        print(f"resuming: {skipped} (configuration, problem) pairs already in {store.path}", flush=True)
    if not todo:
        return 0
    run_id = uuid.uuid4().hex[:12]
    _warm_up(engine, configs, problems[0].prompt)
    calibration = measure_step_cost(engine, problems[0].prompt)
    append_jsonl(out / CALIBRATION_FILE, {"run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                          **calibration, "machine": describe_machine(),
                                          "drafter_model": engine.drafter.name, "expert_model": engine.expert.name})
    print(f"step cost: drafter {calibration['drafter_step_ms']:.1f} ms, expert {calibration['expert_step_ms']:.1f} ms, "
          f"c = {calibration['c']:.3f}", flush=True)
    if batch is not None:
        from .batched import run_batched

        run_batched(engine, todo, concurrency=batch, base_seed=base_seed, run_id=run_id, out=out, store=store,
                    timeout=timeout, memory_mb=memory_mb, latency_sample=latency_sample, progress=progress)
        return len(todo)
    bar = tqdm(todo, desc="tradeoff", unit="gen", disable=not progress, dynamic_ncols=True)
    for index, problem, config in bar:
        bar.set_postfix_str(f"{problem.task_id} {config.label} {config.sampling}")
        record = run_one(engine, config, problem, problem_seed(base_seed, index), run_id=run_id,
                         timeout=timeout, memory_mb=memory_mb)
        store.add(record)
    bar.close()
    return len(todo)


def _warm_up(engine, configs: list[BenchConfig], prompt: str) -> None:
    """A few tokens with each model alone (and through transformers if hf-assisted is measured),
    so one-off costs (allocations, kernel selection) are not charged to the first configuration."""
    from .configs import DRAFTER, EXPERT, HF_ASSISTED
    from .run import generate_with_engine, generate_with_hf_assisted

    template = configs[0]
    for method in (EXPERT, DRAFTER):
        generate_with_engine(engine, BenchConfig(method, None, "greedy", template.block_size, 4), prompt, seed=0)
    if any(c.method == HF_ASSISTED for c in configs):
        generate_with_hf_assisted(engine, BenchConfig(HF_ASSISTED, None, "greedy", template.block_size, 4),
                                  prompt, seed=0)


def step_cost_ratio(out: Path) -> float:
    """c for the records in `out`: the median of the invocations' calibrations."""
    values = [r["c"] for r in read_jsonl(out / CALIBRATION_FILE)]
    return statistics.median(values) if values else math.nan


def read_records(directory: Path, task_ids: set[str] | None = None) -> list[dict]:
    """The records in `directory` (only those of `task_ids`, if given)."""
    return [r for r in read_jsonl(directory / RECORDS_FILE) if task_ids is None or r["task_id"] in task_ids]


def quality_sections(summaries, samplings, out: Path, *, curves: bool = False) -> list[str]:
    """Per sampling setting and quality measure: a heading, Table 2 and the plot written to `out`;
    `curves`: each rule's alpha curve before the table, plots named alpha-curves_* with alphas labelled."""
    parts = []
    for sampling in samplings:
        for measure in QUALITY_MEASURES:
            name = measure.replace("_", "-")
            path = plot_tradeoff(summaries, sampling, measure,
                                 out / (f"alpha-curves_{name}_{sampling}.png" if curves else f"{name}_{sampling}.png"),
                                 label_alphas=curves)
            parts += [f"## {QUALITY_MEASURES[measure][3]}, {sampling}", "",
                      *([markdown_alpha_curves(summaries, sampling, measure)] if curves else []),
                      markdown_table(summaries, sampling, measure), f"![{name} {sampling}]({path.name})", ""]
    return parts


def write_report(out: Path, task_ids: set[str] | None = None) -> str:
    """summary.jsonl, table.md and plots from the records in `out` (only those of `task_ids`, if
    given: `--limit N` reports on the first N problems); returns the markdown."""
    records = read_records(out, task_ids)
    if not records:
        raise ValueError(f"no records in {out}: run the benchmark first")
    c = step_cost_ratio(out)
    c_in_run = step_cost_from_records(records)
    calibrations = read_jsonl(out / CALIBRATION_FILE)
    summaries = summarize(records, c)
    with (out / SUMMARY_FILE).open("w") as f:
        for row in summary_records(summaries, c):
            f.write(json.dumps(row) + "\n")
    samplings = [s for s in SAMPLINGS if any(x.sampling == s for x in summaries)]
    parts = ["# Trade-off results", ""]
    if calibrations:
        machine = calibrations[-1]["machine"]
        parts += [
            f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
            f"({machine['torch_threads']} threads). Pair: drafter `{calibrations[-1]['drafter_model']}`, "
            f"expert `{calibrations[-1]['expert_model']}`, dtype {records[-1]['dtype']}.",
            f"Step cost ratio c = {c:.3f}: median over {len(calibrations)} start-of-run calibration(s) ("
            + ", ".join(f"c={r['c']:.3f} at {r['drafter_step_ms']:.0f}/{r['expert_step_ms']:.0f} ms" for r in calibrations)
            + " drafter/expert per decode step; 1-minute load averages at start: "
            + ", ".join(f"{r['machine']['load_average'][0]:.1f}" for r in calibrations if "load_average" in r["machine"])
            + f"). Cross-check inside lossless speculative rounds (drafter step / expert verify step): "
            f"{c_in_run:.3f}.",
            "",
        ]
    parts += quality_sections(summaries, samplings, out)
    batched_runs = read_jsonl(out / BATCHED_RUNS_FILE)
    if batched_runs:
        parts += ["## Batched evaluation", "",
                  "Latencies of batched records are modelled single-stream latencies (`latency: modelled`).", "",
                  markdown_batched(batched_runs, read_jsonl(out / LATENCY_CHECK_FILE)), ""]
    parts += ["## Every configuration", "", markdown_summary(summaries)]
    text = "\n".join(parts)
    (out / "table.md").write_text(text)
    return text


COMBINED_FILE = "curves.md"


def write_combined_report(sources: list[Path], out: Path, task_ids: set[str] | None = None) -> str:
    """The alpha curves of a sweep run as several invocations into `sources` (each directory with
    its own expert-only reference, since wall-clock is compared only within an invocation): every
    configuration summarised in its own directory, one that several hold (expert-only, lossless)
    taken from the first; then per sampling setting the curves, the chosen alpha per rule, Table 2
    and the plots, written to `out` (curves.md, alpha-curves_<measure>_<sampling>.png)."""
    summaries, seen = [], set()
    yardsticks = ["| directory | expert-only s/problem | lossless rel. latency [paired 95% CI] | c |", "|---|---|---|---|"]
    for source in sources:
        records = read_records(Path(source), task_ids)
        if not records:
            raise ValueError(f"--combine {source}: no records there (of the problems asked for)")
        c = step_cost_ratio(Path(source))
        here = summarize(records, c)
        for s in here:
            if s.config not in seen:
                seen.add(s.config)
                summaries.append(s)
        # The same methods timed by each invocation: how far its latency model and machine moved.
        for expert in (s for s in here if s.method == EXPERT):
            lossless = next((s for s in here if s.method == LOSSLESS and s.sampling == expert.sampling
                             and s.max_new_tokens == expert.max_new_tokens), None)
            yardsticks.append(f"| `{source}` ({expert.sampling}) | {expert.seconds_per_problem:.1f} | "
                              + ("–" if lossless is None else f"{lossless.relative_latency:.2f} "
                                 f"[{lossless.latency_low:.2f}, {lossless.latency_high:.2f}]") + f" | {c:.3f} |")
    summaries.sort(key=summary_order)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# Alpha curves", "", "From " + ", ".join(f"`{source}`" for source in sources)
             + ": each configuration's relative latency and paired differences against the expert-only "
               "run of its own directory; expert-only and lossless as in the first. What each directory's "
               "own runs of the same methods gave:", "", *yardsticks, ""]
    parts += quality_sections(summaries, [s for s in SAMPLINGS if any(x.sampling == s for x in summaries)], out,
                              curves=True)
    text = "\n".join(parts)
    (out / COMBINED_FILE).write_text(text)
    return text
