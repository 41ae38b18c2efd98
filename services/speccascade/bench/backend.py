"""`speccascade bench backend`: the model backends side by side on one device, for a drafter and an
expert (default: Qwen2.5 0.5B- and 7B-shaped models with random weights; or any model sources).

Per model, in one run with the steps interleaved rep by rep (hf, static, reference, hf, ...):
- per-step milliseconds of the `hf` and `static` backends and of the reference (transformers'
  modules over its own StaticCache, replayed as one CUDA graph on a GPU: the floor without a
  compiler), for 1 and gamma + 1 new tokens, batch 1 and 8, contexts 512 and 2,048;
- c = drafter step / expert step per backend;
- the in-process lossless loop at full acceptance (the model drafting for itself, greedy): its
  time per round against its ideal, gamma one-token steps plus one (gamma + 1)-token verify.

`--tiny` runs tiny shapes on the CPU in seconds (CI); there the reference runs uncaptured.
Runnable without Ray or gRPC: `python -m speccascade.bench.backend` (the GPU machine has neither).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SHAPES = {  # Qwen2.5 configurations (the weights are random: speed does not depend on them)
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "tiny-drafter": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1000, tie_word_embeddings=True),
    "tiny-expert": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=256, vocab_size=1000, tie_word_embeddings=False),
}
IMPLEMENTATIONS = ("hf", "static", "reference")
WARMUP_STEPS = 3  # untimed steps per shape first (graph capture, allocator, kernel selection)


@dataclass
class StepTiming:
    model: str
    implementation: str
    batch: int
    context: int
    tokens: int
    ms_median: float
    ms_p10: float
    ms_p90: float


@dataclass
class LoopTiming:
    model: str
    backend: str
    rule: str
    acceptance: float  # drafted tokens kept per drafted token
    gamma: int
    rounds: int
    round_ms_median: float
    ideal_round_ms: float  # gamma one-token steps + one (gamma + 1)-token verify, same backend, same run

    @property
    def efficiency(self) -> float:
        return self.ideal_round_ms / self.round_ms_median


@dataclass
class Report:
    device: str
    torch: str
    transformers: str
    dtype: str
    gamma: int
    models: dict[str, str]  # role -> model
    steps: list[StepTiming] = field(default_factory=list)
    loops: list[LoopTiming] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def step(self, model: str, implementation: str, batch: int, context: int, tokens: int) -> StepTiming | None:
        for s in self.steps:
            if (s.model, s.implementation, s.batch, s.context, s.tokens) == (model, implementation, batch, context,
                                                                               tokens):
                return s
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(spec: str, device: torch.device, dtype: torch.dtype):
    """A shape preset with random weights, or a model source (packaged name, directory, hub id)."""
    if spec in SHAPES:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(**SHAPES[spec], max_position_embeddings=32768, rope_theta=1e6,
                             attn_implementation="sdpa")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            torch.manual_seed(0)
            with torch.device(device):
                return Qwen2ForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
    from ..engine.backends import load_model
    from ..engine.sources import resolve_model

    return load_model(resolve_model(spec).path, dtype=dtype, device=device)


def random_tokens(count: int, vocab: int, generator: torch.Generator) -> list[int]:
    return torch.randint(10, vocab - 10, (count,), generator=generator).tolist()


class BackendStep:
    """One backend, `batch` sessions prefilled with `context` tokens; each call scores `tokens` new
    tokens per session after the context (rolling back the previous call's)."""

    def __init__(self, backend, batch: int, context: int, generator: torch.Generator):
        from ..engine.backends import ScoreJob

        self.backend, self.context, self.generator = backend, context, generator
        vocab = backend.vocab_size
        self.bases = [random_tokens(context, vocab, generator) for _ in range(batch)]
        self.sessions = [backend.new_session() for _ in range(batch)]
        backend.score([ScoreJob(s, b, context) for s, b in zip(self.sessions, self.bases)])  # prefill
        self._job = ScoreJob

    def __call__(self, tokens: int) -> None:
        vocab = self.backend.vocab_size
        jobs = [self._job(s, b + random_tokens(tokens, vocab, self.generator), self.context + 1)
                for s, b in zip(self.sessions, self.bases)]
        self.backend.score(jobs)

    def close(self) -> None:
        for session in self.sessions:
            self.backend.release(session)


class ReferenceStep:
    """transformers' modules over transformers' StaticCache, one step captured as a CUDA graph
    (uncaptured on the CPU): the per-step floor without a compiler, for comparison."""

    def __init__(self, model, batch: int, context: int, tokens: int, room: int, generator: torch.Generator):
        from transformers import StaticCache

        from ..engine.backends.base import CacheKwargs

        device = next(model.parameters()).device
        self.device = device
        try:
            cache = StaticCache(config=model.config, max_cache_len=context + room)
        except TypeError:  # older signature
            cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=context + room,
                                device=device, dtype=next(model.parameters()).dtype)
        kwargs = CacheKwargs.of(model)
        vocab = model.config.vocab_size
        prefill = torch.tensor([random_tokens(context, vocab, generator) for _ in range(batch)], device=device)
        positions = torch.arange(context, device=device)
        with torch.inference_mode():
            model(input_ids=prefill, position_ids=positions.expand(batch, -1), use_cache=True, logits_to_keep=1,
                  **kwargs(cache, positions))
        ids = torch.tensor([random_tokens(tokens, vocab, generator) for _ in range(batch)], device=device)
        step_positions = torch.arange(context, context + tokens, device=device)

        def step():
            out = model(input_ids=ids, position_ids=step_positions.expand(batch, -1).contiguous(), use_cache=True,
                        logits_to_keep=tokens, **kwargs(cache, step_positions))
            return torch.softmax(out.logits.float(), dim=-1)

        self._run: Callable[[], object] = step
        if device.type == "cuda":
            with torch.inference_mode():
                side = torch.cuda.Stream(device=device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
            self._run = graph.replay
        self._cache = cache

    def __call__(self, tokens: int) -> None:
        with torch.inference_mode():
            self._run()


def time_interleaved(steps: dict[str, Callable[[], None]], device: torch.device, reps: int) -> dict[str, list[float]]:
    """Milliseconds of each step, rep by rep in turn, after untimed warm-up steps."""
    for name, step in steps.items():
        with stage(f"warm-up of {name}"):
            for _ in range(WARMUP_STEPS):
                step()
            synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            with stage(f"step of {name}"):
                synchronize(device)
                started = time.perf_counter()
                step()
                synchronize(device)
            times[name].append(1e3 * (time.perf_counter() - started))
    return times


@contextmanager
def stage(what: str):
    """Name the work in progress in any error it raises (a device-side assert surfaces at the next
    synchronisation, so every stage ends with one on a GPU)."""
    try:
        yield
    except Exception as error:
        raise RuntimeError(f"{what} failed: {error}") from error


def summarize(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return statistics.median(ordered), at(0.1), at(0.9)


def measure_reference(spec: str, args, report: Report) -> None:
    """The reference at batch 1 and the first context, 1 and gamma + 1 tokens, in a process of its own.

    On the H100 with transformers 5.17 (2026-11-27), a third StaticCache graph in one process, of any
    shape, replayed into a device-side index assert, which poisons the CUDA context for every later
    measurement; two per process, the figures the targets need, replay cleanly."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "speccascade.bench.backend", "--reference-only", "--drafter", spec,
               "--device", args.device, "--dtype", args.dtype, "--gamma", str(args.gamma),
               "--contexts", str(args.contexts[0]), "--reps", str(args.reps)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        report.errors.append(f"reference for {spec} failed (exit {done.returncode}): {done.stderr[-2000:]}")
        return
    report.steps += [StepTiming(**json.loads(line)) for line in lines]


def run_reference_only(args) -> int:
    """Print the reference's step timings as JSON lines (see `measure_reference`)."""
    from ..engine.backends import parse_dtype, resolve_device

    device = resolve_device(args.device)
    model = build_model(args.drafter, device, parse_dtype(args.dtype))
    generator = torch.Generator().manual_seed(1)
    context = args.contexts[0]
    for tokens in (1, args.gamma + 1):
        room = tokens * (args.reps + WARMUP_STEPS + 4)
        reference = ReferenceStep(model, 1, context, tokens, room, generator)
        values = time_interleaved({"reference": lambda r=reference, t=tokens: r(t)}, device, args.reps)["reference"]
        median, p10, p90 = summarize(values)
        print(json.dumps(asdict(StepTiming(args.drafter, "reference", 1, context, tokens, median, p10, p90))),
              flush=True)
        del reference
    return 0


def measure_steps(name: str, model, backends: dict, args, report: Report, progress) -> None:
    generator = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    for context in args.contexts:
        for batch in args.batches:
            with stage(f"{name}: prefill of batch {batch} at context {context}"):
                prepared = {kind: BackendStep(backend, batch, context, generator) for kind, backend in backends.items()}
                synchronize(device)
            for tokens in (1, args.gamma + 1):
                steps = {kind: (lambda p=p, t=tokens: p(t)) for kind, p in prepared.items()}
                with stage(f"{name}: batch {batch}, context {context}, {tokens} tokens"):
                    timings = time_interleaved(steps, device, args.reps)
                for kind, values in timings.items():
                    median, p10, p90 = summarize(values)
                    report.steps.append(StepTiming(name, kind, batch, context, tokens, median, p10, p90))
                progress.update(1)
            for p in prepared.values():
                p.close()
            if device.type == "cuda":
                torch.cuda.empty_cache()


async def loop_round_times(drafter, expert, prompt: list[int], request, rounds: int,
                           device: torch.device) -> tuple[list[float], float]:
    """Milliseconds of each of `rounds` rounds of the decoding loop, and the share of drafted
    tokens accepted."""
    from ..engine.loop import speculative_rounds

    times: list[float] = []
    drafted = accepted = 0
    loop = speculative_rounds(drafter, expert, prompt, request)
    synchronize(device)
    previous = time.perf_counter()
    async for record in loop:
        synchronize(device)
        now = time.perf_counter()
        times.append(1e3 * (now - previous))
        previous = now
        drafted, accepted = drafted + record.drafted, accepted + record.accepted
        if len(times) == rounds:
            break
    await loop.aclose()
    return times, accepted / max(drafted, 1)


def measure_loops(name: str, model, backends: dict, args, report: Report, progress) -> None:
    """The model drafting for itself, in-process, per backend: `token` at alpha = 1 (pi = q, so every
    drafted token is kept and the expert still verifies every block: full acceptance by
    construction) and `lossless` (the same work; with random weights in bf16, near-ties that a
    1-token and a (gamma + 1)-token pass break differently reject some tokens)."""
    from ..engine.request import GenerationRequest
    from ..engine.roles import LocalDrafter, LocalExpert

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(2)
    for kind, backend in backends.items():
        partner = type(backend)(model, name=f"{name}-drafter", **backend_options(kind, args))
        prompt = random_tokens(args.contexts[0], backend.vocab_size, generator)
        ideal = (args.gamma * report.step(name, kind, 1, args.contexts[0], 1).ms_median
                 + report.step(name, kind, 1, args.contexts[0], args.gamma + 1).ms_median)
        for rule, alpha in (("token", 1.0), ("lossless", 0.0)):
            request = GenerationRequest(prompt="loop probe", rule=rule, alpha=alpha, block_size=args.gamma, seed=0)
            drafter, expert = LocalDrafter(partner), LocalExpert(backend)
            # The first pass captures every graph the second replays; the first round prefills.
            for timed in (False, True):
                with stage(f"{name}: loop on {kind}, {rule}"):
                    times, acceptance = asyncio.run(loop_round_times(drafter, expert, prompt, request,
                                                                     args.loop_rounds + 1, device))
                drafter.release()
                expert.release()
            median = statistics.median(times[1:])
            report.loops.append(LoopTiming(name, kind, rule, acceptance, args.gamma, len(times) - 1, median, ideal))
        del partner
        progress.update(1)


def backend_options(kind: str, args) -> dict:
    if kind == "static":
        return dict(slots=max(args.batches), max_len=max(args.contexts) + args.gamma * (args.loop_rounds + 4) + 64)
    return {}


def check_targets(report: Report, expert: str, drafter: str) -> list[tuple[str, str, bool]]:
    """The issue's GPU targets: (what, measured, met)."""
    out = []
    if not report.steps:
        return out
    context = 512 if 512 in {s.context for s in report.steps} else min(s.context for s in report.steps)
    g1 = report.gamma + 1
    for model in (drafter, expert):
        static, reference = report.step(model, "static", 1, context, 1), report.step(model, "reference", 1, context, 1)
        if static and reference:
            ratio = static.ms_median / reference.ms_median
            out.append((f"{model}: static decode within 10% of the reference (batch 1, ctx {context})",
                        f"{static.ms_median:.2f} vs {reference.ms_median:.2f} ms = {ratio:.2f}x", ratio <= 1.10))
    one, verify = report.step(expert, "static", 1, context, 1), report.step(expert, "static", 1, context, g1)
    if one and verify:
        ratio = verify.ms_median / one.ms_median
        out.append((f"{expert}: {g1}-token verify / 1-token step (static) <= 1.15", f"{ratio:.2f}x", ratio <= 1.15))
    batches = sorted({s.batch for s in report.steps})
    if len(batches) > 1:
        big = report.step(expert, "static", batches[-1], context, 1)
        if one and big:
            ratio = big.ms_median / one.ms_median
            out.append((f"{expert}: batch {batches[-1]} / batch 1 (static) <= 1.6", f"{ratio:.2f}x", ratio <= 1.6))
    for loop in report.loops:
        if loop.backend == "static" and loop.rule == "token":
            out.append((f"{loop.model}: loop at full acceptance >= 0.9 of ideal (static)",
                        f"{loop.efficiency:.2f}", loop.efficiency >= 0.9))
    return out


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]bench backend[/] on {report.device} (torch {report.torch}, transformers "
                  f"{report.transformers}, {report.dtype}, gamma {report.gamma})")
    table = Table(title="ms per step, median [p10-p90]; steps interleaved rep by rep")
    for column in ("model", "batch", "context", "tokens", *IMPLEMENTATIONS, "static / reference"):
        table.add_column(column, justify="right")
    keys = sorted({(s.model, s.batch, s.context, s.tokens) for s in report.steps},
                  key=lambda k: (list(report.models.values()).index(k[0]), k[2], k[1], k[3]))
    for model, batch, context, tokens in keys:
        cells = {i: report.step(model, i, batch, context, tokens) for i in IMPLEMENTATIONS}
        text = [f"{c.ms_median:.2f} [{c.ms_p10:.2f}-{c.ms_p90:.2f}]" if c else "-" for c in cells.values()]
        ratio = (f"{cells['static'].ms_median / cells['reference'].ms_median:.2f}"
                 if cells["static"] and cells["reference"] else "-")
        table.add_row(model, str(batch), str(context), str(tokens), *text, ratio)
    console.print(table)
    drafter, expert = report.models["drafter"], report.models["expert"]
    for error in report.errors:
        console.print(f"[red]error[/] {error}")
    if not report.steps:
        return
    context = report.steps[0].context
    costs = Table(title=f"c = drafter step / expert step (batch 1, context {context}, 1 token)")
    for column in ("implementation", "drafter ms", "expert ms", "c"):
        costs.add_column(column, justify="right")
    for kind in IMPLEMENTATIONS:
        d, e = report.step(drafter, kind, 1, context, 1), report.step(expert, kind, 1, context, 1)
        if d and e:
            costs.add_row(kind, f"{d.ms_median:.2f}", f"{e.ms_median:.2f}", f"{d.ms_median / e.ms_median:.2f}")
    console.print(costs)
    loops = Table(title="the in-process loop, model drafting for itself: ms per round vs ideal "
                        "(gamma 1-token steps + one verify)")
    for column in ("model", "backend", "rule", "acceptance", "rounds", "ms/round", "ideal ms", "ideal / measured"):
        loops.add_column(column, justify="right")
    for loop in report.loops:
        loops.add_row(loop.model, loop.backend, loop.rule, f"{loop.acceptance:.2f}", str(loop.rounds),
                      f"{loop.round_ms_median:.2f}", f"{loop.ideal_round_ms:.2f}", f"{loop.efficiency:.2f}")
    console.print(loops)
    for what, measured, met in check_targets(report, expert, drafter):
        console.print(f"{'[green]met[/]' if met else '[red]not met[/]'}  {what}: {measured}")


def run(args: argparse.Namespace) -> int:
    import transformers
    from tqdm import tqdm

    from ..engine.backends import backend_class, parse_dtype, resolve_device

    if args.reference_only:
        return run_reference_only(args)
    if args.tiny:
        args.drafter, args.expert = args.drafter or "tiny-drafter", args.expert or "tiny-expert"
        args.contexts, args.batches = args.contexts or [64, 128], args.batches or [1, 4]
        args.reps, args.loop_rounds = min(args.reps, 5), min(args.loop_rounds, 6)
    args.drafter, args.expert = args.drafter or "qwen2.5-0.5b", args.expert or "qwen2.5-7b"
    args.contexts, args.batches = args.contexts or [512, 2048], args.batches or [1, 8]
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    report = Report(device=name, torch=torch.__version__, transformers=transformers.__version__, dtype=args.dtype,
                    gamma=args.gamma, models={"drafter": args.drafter, "expert": args.expert})
    shapes = len(args.contexts) * len(args.batches) * 2
    try:
        with tqdm(total=2 * (shapes + 2), desc="bench backend", unit="step") as progress:
            for spec in (args.drafter, args.expert):
                measure_reference(spec, args, report)
                try:
                    model = build_model(spec, device, dtype)
                    backends = {kind: backend_class(kind)(model, name=spec, **backend_options(kind, args))
                                for kind in ("hf", "static")}
                    measure_steps(spec, model, backends, args, report, progress)
                    measure_loops(spec, model, backends, args, report, progress)
                finally:
                    backends = model = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except Exception:  # report what was measured, and why the rest was not
        report.errors.append(traceback.format_exc())
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(report)
        data["targets"] = [{"what": w, "measured": m, "met": ok} for w, m, ok in
                           check_targets(report, args.expert, args.drafter)]
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def register(benches) -> None:
    parser = benches.add_parser("backend", help="hf vs static backend per step, c, loop overhead, vs a CUDA-graph reference")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    shapes = ", ".join(SHAPES)
    parser.add_argument("--drafter", help=f"drafter: a shape with random weights ({shapes}) or a model source "
                                          "(default qwen2.5-0.5b)")
    parser.add_argument("--expert", help="expert: a shape or a model source (default qwen2.5-7b)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--gamma", type=int, default=5, help="block size: verify steps score gamma + 1 tokens")
    parser.add_argument("--contexts", type=_int_list, help="contexts in tokens (default 512,2048)")
    parser.add_argument("--batches", type=_int_list, help="batch sizes (default 1,8)")
    parser.add_argument("--reps", type=int, default=30, help="timed steps per shape and implementation")
    parser.add_argument("--loop-rounds", type=int, default=24, help="timed rounds of the loop per backend")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on small contexts: seconds on a CPU")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)


if __name__ == "__main__":
    import sys

    standalone = argparse.ArgumentParser(prog="python -m speccascade.bench.backend", description=__doc__.splitlines()[0])
    add_arguments(standalone)
    sys.exit(run(standalone.parse_args()))
