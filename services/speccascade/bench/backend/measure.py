"""What `bench backend` measures per model: the steps of each backend against the reference, and the
decoding loop at full acceptance against its ideal."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .steps import (
    WARMUP_STEPS,
    BackendStep,
    ReferenceStep,
    build_model,
    random_tokens,
    stage,
    summarize,
    synchronize,
    time_interleaved,
)


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


def measure_reference(spec: str, args, report: Report) -> None:
    """The reference at batch 1 and the first context, 1 and gamma + 1 tokens, in a process of its own.

    On the H100 with transformers 5.17 (2026-11-27), a third StaticCache graph in one process, of any
    shape, replayed into a device-side index assert, which poisons the CUDA context for every later
    measurement; two per process, the figures the targets need, replay cleanly."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "speccascade.bench.backend.cli", "--reference-only", "--drafter", spec,
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
    from ...engine.backends import parse_dtype, resolve_device

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
    tokens accepted after the first round (which prefills and drafts one token: the caller's
    times skip it too)."""
    from ...engine.loop import speculative_rounds

    times: list[float] = []
    drafted = accepted = 0
    loop = speculative_rounds(drafter, expert, prompt, request, limit=request.max_new_tokens)
    synchronize(device)
    previous = time.perf_counter()
    async for record in loop:
        synchronize(device)
        now = time.perf_counter()
        times.append(1e3 * (now - previous))
        previous = now
        if len(times) > 1:
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
    from ...engine.request import GenerationRequest
    from ...engine.roles import LocalDrafter, LocalExpert

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(2)
    for kind, backend in backends.items():
        partner = type(backend)(model, name=f"{name}-drafter", **backend_options(kind, args))
        prompt = random_tokens(args.contexts[0], backend.vocab_size, generator)
        ideal = (args.gamma * report.step(name, kind, 1, args.contexts[0], 1).ms_median
                 + report.step(name, kind, 1, args.contexts[0], args.gamma + 1).ms_median)
        for rule, alpha in (("token", 1.0), ("lossless", 0.0)):
            # Pipelining off: the ideal round is gamma steps then one verify, in sequence.
            request = GenerationRequest(prompt="loop probe", rule=rule, alpha=alpha, block_size=args.gamma, seed=0,
                                        pipeline="off")
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
