"""What a local Serve stack's own periodic work costs a model's forward passes on the same cores:
one-row decode steps of a model in this process, with an idle stack started as `speccascade serve`
starts it (a tiny random pair, so its tiers cost nothing) running beside them, against the same
steps with every process of the stack stopped (SIGSTOP), alternated pair by pair (A, B, B, A ...)
so that the machine's drift falls on both.

    .venv/bin/python scripts/bench_serve_background.py --pairs 16
    .venv/bin/python scripts/bench_serve_background.py --env RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.1

Prints the median step with the stack running and stopped, and the per-pair ratio running / stopped
with its quartiles. `--env NAME=VALUE` starts the stack with that in its environment (the stack's
controller and proxies keep a value the environment sets, `app/launcher.py`, `LOCAL_SERVE_ENV`;
the replicas flush Serve's metrics once a second regardless, `app.SERVE_METRICS_ENV`). The model is the packaged
drafter (`--model`: any source), in bf16 or fp32 (`--dtype`), with this process's torch threads.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
READY = "Ctrl-C to stop"  # what `speccascade serve` prints once the application is up


def descendants(root: int) -> list[int]:
    """`root` and every process under it (the stack's Ray cluster is started by its `serve`)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def decode_step_ms(model, steps: int, context: int) -> float:
    """Median one-row decode step after a prefill of `context` random tokens."""
    from transformers import DynamicCache

    ids = torch.randint(100, 5000, (1, context))
    times = []
    with torch.no_grad():
        cache = DynamicCache()
        token = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        for _ in range(steps):
            started = time.perf_counter()
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def start_stack(pair: tuple[str, str], env: dict[str, str], timeout_s: float) -> subprocess.Popen:
    stack = subprocess.Popen([sys.executable, "-m", "speccascade.cli", "serve", "--drafter", pair[0], "--expert", pair[1]],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env},
                             cwd=REPO)
    deadline = time.monotonic() + timeout_s
    for line in stack.stdout:
        if READY in line:
            return stack
        if time.monotonic() > deadline:
            break
    stack.send_signal(signal.SIGINT)
    stack.wait(60)
    raise RuntimeError(f"the stack did not come up within {timeout_s:.0f} s (exit {stack.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="the model whose steps are timed")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--pairs", type=int, default=16, help="running/stopped pairs")
    parser.add_argument("--steps", type=int, default=25, help="decode steps a measurement (its median counts)")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--settle-s", type=float, default=10.0, help="wait after the stack is up")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="in the stack's environment (repeatable)")
    args = parser.parse_args()
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    if args.pairs < 1 or args.steps < 1:
        parser.error(f"--pairs {args.pairs} and --steps {args.steps} must be at least 1")

    from speccascade.bench.tiny import save_pair
    from speccascade.models import resolve_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(args.model).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    model.eval()
    with tempfile.TemporaryDirectory(prefix="bench-background-") as root:
        pair = save_pair(Path(root), AutoTokenizer.from_pretrained(path), hidden=64, layers=(2, 2), drafter_noise=0.1)
        stack = start_stack(pair, env, timeout_s=300)
        try:
            time.sleep(args.settle_s)
            pids = descendants(stack.pid)
            decode_step_ms(model, 5, args.context)  # warm
            running, stopped, ratios = [], [], []
            for index in range(args.pairs):
                got = {}
                for state in (("running", "stopped") if index % 2 == 0 else ("stopped", "running")):
                    if state == "stopped":
                        signal_all(pids, signal.SIGSTOP)
                        time.sleep(0.2)
                    try:
                        got[state] = decode_step_ms(model, args.steps, args.context)
                    finally:
                        if state == "stopped":
                            signal_all(pids, signal.SIGCONT)
                    time.sleep(0.5)
                running.append(got["running"])
                stopped.append(got["stopped"])
                ratios.append(got["running"] / got["stopped"])
                print(f"pair {index + 1}/{args.pairs}: running {got['running']:.1f} ms, stopped {got['stopped']:.1f} ms",
                      flush=True)
        finally:
            signal_all(descendants(stack.pid), signal.SIGCONT)
            stack.send_signal(signal.SIGINT)
            stack.wait(120)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"{args.model} ({args.dtype}, {torch.get_num_threads()} threads) decode step beside an idle stack"
          f"{' with ' + ' '.join(args.env) if args.env else ''}: running {statistics.median(running):.1f} ms, "
          f"stopped {statistics.median(stopped):.1f} ms; running / stopped {statistics.median(ratios):.3f} "
          f"[{quartiles[0]:.3f}-{quartiles[2]:.3f}] over {len(ratios)} pairs")


if __name__ == "__main__":
    main()
