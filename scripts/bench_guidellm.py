"""guidellm against a running speccascade service, as a vLLM user runs it: synthetic prompts of a
fixed length, fixed output lengths (`ignore_eos`), one stream at a time and N concurrent streams,
for each method (the cascade as the server's policy has it, and expert-only through the request's
extra `method` field). Writes guidellm's own JSON report per run under --out and prints one table:
TTFT and inter-token latency (median, p95), output throughput, requests finished.

    make run &                                   # the service on the packaged pair
    make tools                                   # guidellm in .tools/guidellm
    .venv/bin/python scripts/bench_guidellm.py --streams 1,4,8 --methods cascade,expert

Run it alone on the machine: guidellm and the service share the CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUIDELLM = REPO / ".tools" / "guidellm" / "bin" / "guidellm"


def backend_arg(target: str, request_format: str, method: str) -> str:
    extras = "" if method == "cascade" else f",extras.body.method={method}"
    return f"kind=openai_http,target={target},request_format={request_format}{extras}"


def run_one(args, method: str, streams: int, out: Path) -> dict:
    profile = "kind=synchronous" if streams == 1 else f"kind=concurrent,streams={streams}"
    requests = max(args.requests, streams * args.rounds)
    command = [str(GUIDELLM), "run", "--backend", backend_arg(args.target, args.request_format, method),
               "--profile", profile, "--constraint", f"kind=max_requests,count={requests}",
               "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
               "--tokenizer", f"kind=hf_auto,model={args.tokenizer}", "--output", f"kind=json,path={out}",
               "--disable-progress"]
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(out.parent)})
    if done.returncode != 0:
        raise RuntimeError(f"guidellm failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(out.read_text())


def summary(report: dict) -> dict:
    (benchmark,) = report["benchmarks"]
    metrics = benchmark["metrics"]

    def successful(name: str) -> dict:
        return metrics[name]["successful"]

    totals = metrics["request_totals"]
    requests = benchmark["requests"]["successful"]
    started = min((r["request_start_time"] for r in requests), default=0.0)
    ended = max((r["request_end_time"] for r in requests), default=0.0)
    output_tokens = sum(r["output_tokens"] for r in requests)
    return {"finished": totals["successful"], "total": totals["total"],
            "ttft_ms_median": successful("time_to_first_token_ms")["median"],
            "ttft_ms_p95": successful("time_to_first_token_ms")["percentiles"]["p95"],
            "itl_ms_median": successful("inter_token_latency_ms")["median"],
            "itl_ms_p95": successful("inter_token_latency_ms")["percentiles"]["p95"],
            "output_tokens_per_s": output_tokens / (ended - started) if ended > started else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="http://127.0.0.1:8000", help="the service's HTTP address")
    parser.add_argument("--request-format", default="/v1/chat/completions",
                        choices=["/v1/chat/completions", "/v1/completions"])
    parser.add_argument("--tokenizer", help="tokenizer for guidellm's prompts (default: the packaged expert's)")
    parser.add_argument("--methods", default="cascade,expert", help="comma-separated: cascade, expert, drafter, ...")
    parser.add_argument("--streams", default="1,4,8", help="comma-separated concurrent streams (1: synchronous)")
    parser.add_argument("--requests", type=int, default=4, help="requests per run, at least (default 4)")
    parser.add_argument("--rounds", type=int, default=1, help="at least this many requests per stream (default 1)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="one guidellm run's limit")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "guidellm")
    args = parser.parse_args(argv)
    if not GUIDELLM.exists():
        parser.error(f"guidellm is not installed ({GUIDELLM}); run `make tools`")
    if args.tokenizer is None:
        from speccascade.models import EXPERT_DEFAULT, resolve_model

        args.tokenizer = str(resolve_model(EXPERT_DEFAULT, progress=False).path)
    streams = [int(s) for s in args.streams.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not streams or min(streams) < 1 or not methods:
        parser.error(f"--streams={args.streams!r} needs positive integers and --methods={args.methods!r} a method")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for count in streams:  # methods side by side at each load, so drift hits both alike
        for method in methods:
            report = run_one(args, method, count, args.out / f"{method}-{count}-streams.json")
            rows.append({"method": method, "streams": count, **summary(report)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (args.out / "summary.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows}, indent=2) + "\n")
    print("| method | streams | finished | TTFT median | TTFT p95 | ITL median | ITL p95 | output tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['streams']} | {r['finished']}/{r['total']} | {r['ttft_ms_median']:.0f} ms | "
              f"{r['ttft_ms_p95']:.0f} ms | {r['itl_ms_median']:.0f} ms | {r['itl_ms_p95']:.0f} ms | "
              f"{r['output_tokens_per_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
