"""`speccascade bench soak`: C concurrent clients for M minutes against the served cascade, mixed
methods and rules, greedy and sampled, a share of client cancels and of expiring deadlines, and
optionally replica kills on a schedule. It measures what a long run must not show: failed
requests, growing memory, caches left behind, outputs that change with what happened.

Every `--sample-every` seconds it records requests ok / failed / cancelled / deadline-expired,
latency percentiles, the resident memory of every tier replica's process and its cache sessions,
and prints a progress line. When the clients stop it waits `--settle-s` (10 s) and counts the
sessions left; then it replays a sample of the completed requests fault-free (no cancels,
deadlines or kills; the same seeds) and counts identical outputs. Writes `NAME.json` (every
sample, kill and request) and `NAME.png` (memory and sessions over time) under `--out`.

Against a running service (`--target host:port`, and a Ray connection to its cluster through
`--ray-address`, for the replicas' statistics and kills; a service with tenants takes the key from
$SPECCASCADE_API_KEY), or one it starts itself like `speccascade serve` (the real pair by default:
run it under `flock /tmp/speccascade-real-model.lock`). Measures failures, leaks and identical
outputs, not speed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .serve import TASKS, percentile

DEFAULT_OUT = Path("benchmarks/soak")
TIERS = ("Drafter", "Expert")
# (method, rule, alpha): every rule as a cascade, and every baseline.
POLICIES = [
    ("cascade", "lossless", 0.0), ("cascade", "chow", 0.3), ("cascade", "diff", 0.2), ("cascade", "opt", 0.5),
    ("cascade", "token", 0.5), ("cascade", "lossy", 0.3), ("expert", "lossless", 0.0), ("drafter", "lossless", 0.0),
    ("token-cascade", "lossless", 0.3), ("sequence-cascade", "lossless", 0.3),
]
SAMPLINGS = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.7, top_p=0.95)}
DEADLINE_FRACTIONS = (0.2, 1.0)  # a deadline is this share of the median latency so far: most expire mid-way
MIN_COMPLETIONS_FOR_DEADLINES = 3  # before this many completions, deadlines use --deadline-s
STATS_TIMEOUT_S = 10.0  # a replica that does not answer a sample in time (it is starting) is left out
UNARY_SHARE = 0.25  # of requests that are not cancelled by the client, this many use Generate (unary)


# ---- the workload ----

@dataclass(frozen=True)
class RequestSpec:
    """One request of the soak, fully determined by its index and the soak's seed."""

    index: int
    task: int
    method: str
    rule: str
    alpha: float
    sampling: str  # a key of SAMPLINGS
    seed: int
    block_size: int
    max_new_tokens: int
    action: str  # complete | cancel | deadline
    cancel_after_chunks: int
    unary: bool

    def build(self):
        from ..api.client import build_request

        return build_request(messages=[{"role": "user", "content": TASKS[self.task]}], method=self.method,
                             rule=self.rule, alpha=self.alpha, block_size=self.block_size,
                             max_new_tokens=self.max_new_tokens, seed=self.seed, **SAMPLINGS[self.sampling])

    @property
    def label(self) -> str:
        policy = self.method if self.method != "cascade" else f"{self.rule}({self.alpha:g})"
        return f"{policy}/{self.sampling}"


def plan_request(index: int, *, seed: int, cancel_share: float, deadline_share: float, max_new_tokens: int,
                 block_size: int) -> RequestSpec:
    rng = random.Random(f"{seed}:{index}")
    method, rule, alpha = rng.choice(POLICIES)
    draw = rng.random()
    action = "cancel" if draw < cancel_share else "deadline" if draw < cancel_share + deadline_share else "complete"
    return RequestSpec(
        index=index, task=rng.randrange(len(TASKS)), method=method, rule=rule, alpha=alpha,
        sampling=rng.choice(list(SAMPLINGS)), seed=rng.randrange(1 << 31), block_size=block_size,
        max_new_tokens=max_new_tokens, action=action, cancel_after_chunks=rng.randint(1, 4),
        unary=action != "cancel" and rng.random() < UNARY_SHARE,
    )


@dataclass
class Outcome:
    index: int
    label: str
    action: str
    status: str  # ok | failed | cancelled (by the client, on purpose) | deadline (expired, as planned)
    started_s: float  # since the soak started
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    deadline_s: float | None = None
    code: str = ""  # gRPC status code name of a request that did not complete
    detail: str = ""
    tier_retries: int = 0
    expert_only_fallback: bool = False
    token_ids: list[int] = field(default_factory=list)  # of completed requests


def run_request(client, spec: RequestSpec, *, deadline_s: float | None, clock_zero: float,
                request_id: str | None = None) -> Outcome:
    """Send one request as planned (cancel it after some chunks, or give it a deadline) and say how
    it ended. A completed request must end with its final chunk (finish reason and stats)."""
    import grpc

    from ..api.v1 import speccascade_pb2 as pb

    started = time.monotonic()
    outcome = Outcome(spec.index, spec.label, spec.action, "ok", started - clock_zero, 0.0, deadline_s=deadline_s)
    cancelled = False
    timeout = deadline_s if spec.action == "deadline" else None
    try:
        if spec.unary:
            response = client.generate(spec.build(), timeout=timeout, request_id=request_id)
            outcome.ttft_s = time.monotonic() - started
            outcome.token_ids, final = list(response.token_ids), response
        else:
            call = client.stream(spec.build(), timeout=timeout, request_id=request_id)
            final, chunks = None, 0
            for chunk in call:
                if chunk.token_ids and outcome.ttft_s is None:
                    outcome.ttft_s = time.monotonic() - started
                outcome.token_ids += chunk.token_ids
                chunks += 1
                final = chunk
                if spec.action == "cancel" and chunks >= spec.cancel_after_chunks and not chunk.HasField("stats"):
                    cancelled = True
                    call.cancel()
                    break
        if cancelled:
            outcome.status, outcome.code = "cancelled", "CANCELLED"
        elif final is None or not final.HasField("stats") or final.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
            outcome.status, outcome.code = "failed", "OK"
            outcome.detail = "the call ended without its final chunk (finish reason and stats)"
        else:
            outcome.tier_retries = final.stats.tier_retries
            outcome.expert_only_fallback = final.stats.expert_only_fallback
    except grpc.RpcError as error:
        code = error.code()
        outcome.code, outcome.detail = code.name, (error.details() or "")[:300]
        if spec.action == "deadline" and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            outcome.status = "deadline"
        elif cancelled and code == grpc.StatusCode.CANCELLED:
            outcome.status = "cancelled"
        else:
            outcome.status = "failed"
    outcome.latency_s = time.monotonic() - started
    outcome.tokens = len(outcome.token_ids)
    if outcome.status != "ok":
        outcome.token_ids = []
    return outcome


# ---- samples of the service ----

@dataclass
class ReplicaSample:
    replica_id: str
    pid: int
    rss_bytes: int
    sessions: int
    cache_bytes: int
    released: int
    reclaimed: int
    late_calls: int


@dataclass
class Sample:
    t_s: float
    phase: str  # load | settled (clients stopped --settle-s ago)
    ok: int
    failed: int
    cancelled: int
    deadline: int
    latency_p50_s: float | None  # of requests completed since the previous sample
    latency_p95_s: float | None
    ttft_p50_s: float | None
    router_active_sessions: int | None
    tiers: dict[str, list[ReplicaSample]]

    def sessions(self, tier: str) -> int | None:
        """Cache sessions over the tier's replicas; None if no replica answered (all restarting)."""
        replicas = self.tiers.get(tier, [])
        return sum(r.sessions for r in replicas) if replicas else None


@dataclass
class KillEvent:
    t_s: float
    deployment: str
    replica_id: str


class ServiceProbe:
    """Reads the service's replicas (memory, sessions) and kills them, through Ray."""

    def __init__(self, app: str):
        self.app = app

    def tiers(self) -> dict[str, list[ReplicaSample]]:
        from ..tiers.replicas import tier_replica_stats

        return {tier: [ReplicaSample(s.replica_id, s.pid, s.rss_bytes, s.cache.sessions, s.cache.nbytes,
                                     s.cache.released, s.cache.reclaimed, s.cache.late_calls)
                       for s in tier_replica_stats(self.app, tier, timeout_s=STATS_TIMEOUT_S)]
                for tier in TIERS}

    def router_active_sessions(self) -> int | None:
        from ray import serve
        from ray.exceptions import RayError

        try:
            return serve.get_deployment_handle("Router", app_name=self.app).active_session_count.remote().result(
                timeout_s=30)
        except (TimeoutError, RayError):
            return None

    def kill_one(self, deployment: str, rng: random.Random) -> str:
        import ray

        from ..tiers.replicas import SERVE_NAMESPACE, replica_actor_names, replica_actor_prefix

        names = replica_actor_names(self.app, deployment)
        if not names:
            raise RuntimeError(f"no live {deployment} replica of application {self.app!r} to kill")
        victim = rng.choice(names)
        ray.kill(ray.get_actor(victim, namespace=SERVE_NAMESPACE), no_restart=True)
        return victim.removeprefix(replica_actor_prefix(self.app, deployment))

    def wait_until_running(self, timeout_s: float) -> None:
        from ..tiers.replicas import wait_until_running

        wait_until_running(self.app, ["Router", *TIERS], timeout_s=timeout_s)


# ---- the soak ----

class Soak:
    def __init__(self, args: argparse.Namespace, target: str, app: str, probe: ServiceProbe, console):
        self.args, self.target, self.app, self.probe, self.console = args, target, app, probe, console
        self.outcomes: list[Outcome] = []
        self.samples: list[Sample] = []
        self.kills: list[KillEvent] = []
        self._lock = threading.Lock()
        self._next_index = 0
        self._stop = threading.Event()
        self._zero = time.monotonic()
        self._last_sampled = 0
        self.stopped_s = 0.0

    def now(self) -> float:
        return time.monotonic() - self._zero

    def _take_index(self) -> int:
        with self._lock:
            self._next_index += 1
            return self._next_index - 1

    def _deadline(self, rng: random.Random) -> float:
        with self._lock:
            latencies = [o.latency_s for o in self.outcomes if o.status == "ok"]
        if len(latencies) < MIN_COMPLETIONS_FOR_DEADLINES:
            return self.args.deadline_s
        return max(0.05, rng.uniform(*DEADLINE_FRACTIONS) * statistics.median(latencies))

    def _client(self, number: int) -> None:
        from ..api.client import SpecCascadeClient

        rng = random.Random(f"{self.args.seed}:client{number}")
        with SpecCascadeClient(self.target, application=self.app) as client:
            while not self._stop.is_set():
                spec = self.plan(self._take_index())
                deadline = self._deadline(rng) if spec.action == "deadline" else None
                outcome = run_request(client, spec, deadline_s=deadline, clock_zero=self._zero,
                                      request_id=f"soak-{self.args.seed}-{spec.index}")
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.status == "failed":
                    self.console.print(f"[red]request {spec.index} ({spec.label}) failed: {outcome.code} "
                                       f"{outcome.detail}[/]")

    def plan(self, index: int) -> RequestSpec:
        a = self.args
        return plan_request(index, seed=a.seed, cancel_share=a.cancel_share, deadline_share=a.deadline_share,
                            max_new_tokens=a.max_new_tokens, block_size=a.block_size)

    def sample(self, phase: str) -> Sample:
        tiers = self.probe.tiers()
        router = self.probe.router_active_sessions()
        with self._lock:
            outcomes = list(self.outcomes)
        window = [o for o in outcomes[self._last_sampled:] if o.status == "ok"]
        self._last_sampled = len(outcomes)
        counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "failed", "cancelled", "deadline")}
        latencies = [o.latency_s for o in window]
        ttfts = [o.ttft_s for o in window if o.ttft_s is not None]
        sample = Sample(
            t_s=self.now(), phase=phase, **counts,
            latency_p50_s=percentile(latencies, 0.5) if latencies else None,
            latency_p95_s=percentile(latencies, 0.95) if latencies else None,
            ttft_p50_s=percentile(ttfts, 0.5) if ttfts else None, router_active_sessions=router, tiers=tiers)
        self.samples.append(sample)
        self.console.print(progress_line(sample), soft_wrap=True)
        return sample

    def _kill_schedule(self) -> None:
        """Kill an Expert replica, then a Drafter replica, ... every --kill-every seconds of the load."""
        rng = random.Random(f"{self.args.seed}:kills")
        order = ("Expert", "Drafter")
        number = 0
        while True:
            at = (number + 1) * self.args.kill_every
            if at >= self.args.minutes * 60 or self._stop.wait(timeout=max(0.0, at - self.now())):
                return
            deployment = order[number % 2]
            number += 1
            try:
                victim = self.probe.kill_one(deployment, rng)
            except RuntimeError as error:
                self.console.print(f"[yellow]kill skipped: {error}[/]")
                continue
            self.kills.append(KillEvent(self.now(), deployment, victim))
            self.console.print(f"[bold yellow][{self.now() / 60:5.1f} min] killed {deployment} replica {victim}[/]")

    def run(self) -> None:
        a = self.args
        duration = a.minutes * 60
        self.console.print(f"soak: {a.clients} clients for {a.minutes:g} min against {self.target} "
                           f"(cancels {a.cancel_share:.0%}, deadlines {a.deadline_share:.0%}"
                           + (f", a replica kill every {a.kill_every:g}s" if a.kill_every else "") + ")")
        self._zero = time.monotonic()
        self.sample("load")
        clients = [threading.Thread(target=self._client, args=(i,), daemon=True, name=f"soak-client-{i}")
                   for i in range(a.clients)]
        for thread in clients:
            thread.start()
        killer = None
        if a.kill_every:
            killer = threading.Thread(target=self._kill_schedule, daemon=True, name="soak-killer")
            killer.start()
        try:
            while self.now() < duration:
                time.sleep(min(a.sample_every - self.now() % a.sample_every, duration - self.now()) + 1e-3)
                self.sample("load")
        finally:
            self._stop.set()
            self.console.print(f"[{self.now() / 60:5.1f} min] clients stopping (finishing their requests)...")
            for thread in clients:
                thread.join()
            if killer is not None:
                killer.join()
        self.stopped_s = self.now()
        time.sleep(a.settle_s)
        self.console.print(f"[{self.now() / 60:5.1f} min] {a.settle_s:g}s after the clients stopped:")
        self.sample("settled")

    def reference(self) -> dict:
        """Replay completed requests fault-free (same seeds, no cancels, deadlines or kills) and compare
        their tokens; requests that met a retry or a fallback are always among them. With
        --reference-repeats 2 the replay runs twice and the two are compared too: how often two
        fault-free runs differ (bf16 results depend on how requests were batched together)."""
        a = self.args
        completed = {o.index: o for o in self.outcomes if o.status == "ok"}
        faulted = [i for i, o in completed.items() if o.tier_retries or o.expert_only_fallback]
        others = [i for i in completed if i not in set(faulted)]
        random.Random(f"{a.seed}:reference").shuffle(others)
        chosen = sorted((faulted + others)[: a.reference_limit]) if a.reference_limit else []
        if not chosen:
            return {"compared": 0}
        self.probe.wait_until_running(timeout_s=600)
        replays = []
        for repeat in range(a.reference_repeats):
            self.console.print(f"reference run {repeat + 1}/{a.reference_repeats}: {len(chosen)} completed requests "
                               f"replayed fault-free ({len(faulted)} of them met a retry or fallback)...")
            replays.append(self._replay(chosen, repeat + 1))
        report = compare_with_reference({o.index: o.token_ids for o in self.outcomes if o.status == "ok"},
                                        replays[0], self.plan, self.outcomes)
        if len(replays) > 1:
            report["replay_vs_replay"] = compare_with_reference(
                {i: t for i, t in replays[1].items() if not isinstance(t, str)}, replays[0], self.plan)
        return report

    def _replay(self, indices: list[int], repeat: int) -> dict[int, list[int] | str]:
        """Tokens of each request run again to completion (or its error code), at --clients concurrency."""
        results: dict[int, list[int] | str] = {}
        queue = list(indices)

        def replay():
            from ..api.client import SpecCascadeClient

            with SpecCascadeClient(self.target, application=self.app) as client:
                while True:
                    with self._lock:
                        if not queue:
                            return
                        index = queue.pop()
                    spec = RequestSpec(**{**asdict(self.plan(index)), "action": "complete", "unary": False})
                    outcome = run_request(client, spec, deadline_s=None, clock_zero=self._zero,
                                          request_id=f"soak-{self.args.seed}-{index}-replay{repeat}")
                    results[index] = outcome.token_ids if outcome.status == "ok" else outcome.code

        threads = [threading.Thread(target=replay, daemon=True) for _ in range(self.args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results


def compare_with_reference(tokens_by_index: dict[int, list[int]], reference: dict[int, list[int] | str], plan,
                           outcomes: list[Outcome] = ()) -> dict:
    """Identical / compared, greedy and sampled apart, with the requests that differed (and, given
    the soak's outcomes, whether they met a retry or a fallback)."""
    by_index = {o.index: o for o in outcomes}
    report = {"compared": 0, "reference_failed": [], "differed": []}
    for sampling in SAMPLINGS:
        report[sampling] = {"compared": 0, "identical": 0}
    for index, expected in sorted(reference.items()):
        if isinstance(expected, str):
            report["reference_failed"].append({"index": index, "code": expected})
            continue
        if index not in tokens_by_index:
            continue
        got, spec = tokens_by_index[index], plan(index)
        report["compared"] += 1
        report[spec.sampling]["compared"] += 1
        if got == expected:
            report[spec.sampling]["identical"] += 1
            continue
        first = next((i for i, (x, y) in enumerate(zip(expected, got)) if x != y), min(len(expected), len(got)))
        differed = {"index": index, "label": spec.label, "first_difference_at": first, "tokens": len(got),
                    "reference_tokens": len(expected)}
        if index in by_index:
            differed |= {"tier_retries": by_index[index].tier_retries,
                         "expert_only_fallback": by_index[index].expert_only_fallback}
        report["differed"].append(differed)
    return report


def progress_line(sample: Sample) -> str:
    def gib(tier):
        return "+".join(f"{r.rss_bytes / (1 << 30):.2f}" for r in sample.tiers.get(tier, [])) or "-"

    def seconds(value):
        return f"{value:.1f}s" if value is not None else "-"

    def count(value):
        return "-" if value is None else value

    router = sample.router_active_sessions if sample.router_active_sessions is not None else "?"
    return (f"[{sample.t_s / 60:5.1f} min] ok {sample.ok} failed {sample.failed} cancelled {sample.cancelled} "
            f"deadline {sample.deadline} | p50 {seconds(sample.latency_p50_s)} p95 {seconds(sample.latency_p95_s)} "
            f"| RSS GiB drafter {gib('Drafter')} expert {gib('Expert')} | sessions drafter "
            f"{count(sample.sessions('Drafter'))} expert {count(sample.sessions('Expert'))} router {router}")


# ---- running it ----

def start_service(args: argparse.Namespace) -> tuple[str, str]:
    from ..commands.serve import start_from_config

    endpoints = start_from_config(args.config, drafter=args.drafter, expert=args.expert, dtype=args.dtype,
                                  backend=args.backend, device=args.device, grpc_port=args.grpc_port,
                                  http_port=args.http_port)
    return endpoints.grpc_target, endpoints.app_name


def run(args: argparse.Namespace) -> int:
    import ray
    from rich.console import Console

    from .soak_report import report_again, summarize, write_outputs

    if args.report:
        report_again(args.report)
        return 0
    if args.clients < 1 or args.minutes <= 0 or args.sample_every <= 0:
        raise ValueError(f"--clients={args.clients}, --minutes={args.minutes:g} and --sample-every="
                         f"{args.sample_every:g} must be positive")
    if not 0 <= args.cancel_share + args.deadline_share <= 1 or min(args.cancel_share, args.deadline_share) < 0:
        raise ValueError(f"--cancel-share={args.cancel_share:g} and --deadline-share={args.deadline_share:g} "
                         "must be shares in [0, 1] adding up to at most 1")
    console = Console(stderr=True, highlight=False)
    started_here = args.target is None
    if started_here:
        with console.status("starting Ray and the speccascade application (loading both tiers)..."):
            target, app = start_service(args)
    else:
        target, app = args.target, args.application
        if not ray.is_initialized():
            ray.init(address=args.ray_address, log_to_driver=False)
    soak = Soak(args, target, app, ServiceProbe(app), console)
    try:
        soak.run()
        reference = soak.reference()
    finally:
        if started_here:
            from ..commands.serve import shutdown

            shutdown(console)
    summary = summarize(args, soak.samples, soak.outcomes, soak.kills, reference, stopped_s=soak.stopped_s)
    write_outputs(args, soak.samples, soak.outcomes, soak.kills, summary, stopped_s=soak.stopped_s)
    return 0


def register(benches) -> None:
    from ..commands.serve import add_execution_arguments

    parser = benches.add_parser("soak", help="concurrent clients for minutes, with cancels, deadlines and replica "
                                             "kills: failures, memory slope, sessions left, identical outputs",
                                description=__doc__.split("\n\n")[0])
    service = parser.add_argument_group("the service")
    service.add_argument("--target", help="host:port of a running service (default: start one here)")
    service.add_argument("--application", default="speccascade", help="Serve application name (with --target)")
    service.add_argument("--ray-address", default="auto", help="Ray cluster of the --target service (default auto)")
    service.add_argument("--config", type=Path, help="Serve config when starting here (default: deploy/local-cpu.yaml)")
    service.add_argument("--drafter", help="drafter model source when starting here (default: the packaged pair)")
    service.add_argument("--expert", help="expert model source when starting here")
    service.add_argument("--dtype", choices=["bf16", "fp32"], help="both tiers' dtype when starting here")
    add_execution_arguments(service, overrides_config=True)
    service.add_argument("--grpc-port", type=int, default=9421)
    service.add_argument("--http-port", type=int, default=8421)
    load = parser.add_argument_group("the load")
    load.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    load.add_argument("--minutes", type=float, default=20.0, help="how long the clients run (default 20)")
    load.add_argument("--cancel-share", type=float, default=0.1,
                      help="share of streams the client cancels after 1-4 chunks (default 0.1)")
    load.add_argument("--deadline-share", type=float, default=0.05,
                      help="share of requests with a deadline of 0.2-1x the median latency so far (default 0.05)")
    load.add_argument("--deadline-s", type=float, default=2.0, help="deadline before 3 requests have completed")
    load.add_argument("--max-new-tokens", type=int, default=48)
    load.add_argument("--block-size", type=int, default=5)
    load.add_argument("--kill-every", type=float, default=None, metavar="SECONDS",
                      help="kill an Expert replica, then a Drafter replica, ... every SECONDS (ray.kill)")
    load.add_argument("--seed", type=int, default=0, help="seed of the request plan (and the kills)")
    measure = parser.add_argument_group("the measurement")
    measure.add_argument("--sample-every", type=float, default=30.0, help="seconds between samples (default 30)")
    measure.add_argument("--settle-s", type=float, default=10.0,
                         help="wait this long after the clients stop before counting sessions left (default 10)")
    measure.add_argument("--slope-skip-minutes", type=float, default=2.0,
                         help="leave the first minutes (warm-up) out of the memory slope (default 2)")
    measure.add_argument("--reference-limit", type=int, default=32,
                         help="completed requests replayed fault-free for the identical-output count (default 32)")
    measure.add_argument("--reference-repeats", type=int, default=1, choices=[1, 2],
                         help="2: replay twice and also count how often two fault-free runs agree (default 1)")
    measure.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    measure.add_argument("--name", default="soak", help="file names: NAME.json and NAME.png (default soak)")
    measure.add_argument("--report", type=Path, metavar="JSON",
                         help="no load: summarize a finished soak's JSON again, rewrite it and redraw its plot")
    parser.set_defaults(handler=run)
