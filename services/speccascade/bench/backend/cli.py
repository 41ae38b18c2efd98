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
Runnable without Ray or gRPC: `python -m speccascade.bench.backend.cli` (the GPU machine has neither).
"""

from __future__ import annotations

import argparse
import json
import platform
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from ...commands.serve import non_negative_int, positive_int
from .measure import Report, backend_options, measure_loops, measure_reference, measure_steps, run_reference_only
from .report import check_targets, print_report
from .steps import SHAPES, build_model


def run(args: argparse.Namespace) -> int:
    import transformers
    from tqdm import tqdm

    from ...engine.backends import backend_class, parse_dtype, resolve_device

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
                    if args.loop_rounds:
                        measure_loops(spec, model, backends, args, report, progress)
                    else:
                        progress.update(len(backends))
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


def _positive_int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated, got {text!r}")
    return values


def register(benches) -> None:

    parser = benches.add_parser("backend", help="hf vs static backend per step, c, loop overhead, vs a CUDA-graph reference")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...config.app import DTYPE_NAMES

    shapes = ", ".join(SHAPES)
    parser.add_argument("--drafter", help=f"drafter: a shape with random weights ({shapes}) or a model source "
                                          "(default qwen2.5-0.5b)")
    parser.add_argument("--expert", help="expert: a shape or a model source (default qwen2.5-7b)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="bf16", choices=DTYPE_NAMES)
    parser.add_argument("--gamma", type=positive_int, default=5, help="block size: verify steps score gamma + 1 tokens")
    parser.add_argument("--contexts", type=_positive_int_list, help="contexts in tokens (default 512,2048)")
    parser.add_argument("--batches", type=_positive_int_list, help="batch sizes (default 1,8)")
    parser.add_argument("--reps", type=positive_int, default=30, help="timed steps per shape and implementation")
    parser.add_argument("--loop-rounds", type=non_negative_int, default=24,
                        help="timed rounds of the loop per backend (0: the per-step figures only)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on small contexts: seconds on a CPU")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)


if __name__ == "__main__":
    import sys

    standalone = argparse.ArgumentParser(prog="python -m speccascade.bench.backend.cli", description=__doc__.splitlines()[0])
    add_arguments(standalone)
    sys.exit(run(standalone.parse_args()))
