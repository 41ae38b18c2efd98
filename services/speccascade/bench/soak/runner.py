"""The soak itself: client threads running the plan, a sampler, scheduled kills, then the settle
and a fault-free replay of a sample of completed requests."""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from dataclasses import asdict

from ..timing import percentile
from .probe import KillEvent, Sample, ServiceProbe
from .workload import SAMPLINGS, Outcome, RequestSpec, plan_request, run_request

DEADLINE_FRACTIONS = (0.2, 1.0)  # a deadline is this share of the median latency so far: most expire mid-way
MIN_COMPLETIONS_FOR_DEADLINES = 3  # before this many completions, deadlines use --deadline-s
REPLAY_WAIT_S = 600.0  # how long the replay waits for every replica to run again after the load


class Soak:
    """`end_load` set: the load ends before its minutes are up, and the settle and the replay follow
    as usual; `skip_checks` set: the settle's wait and the replay's remaining requests are skipped
    (a first and a second Ctrl-C: `cli.run`)."""

    def __init__(self, args: argparse.Namespace, target: str, app: str, probe: ServiceProbe, console, *,
                 end_load: threading.Event | None = None, skip_checks: threading.Event | None = None):
        self.args, self.target, self.app, self.probe, self.console = args, target, app, probe, console
        self.end_load = end_load or threading.Event()
        self.skip_checks = skip_checks or threading.Event()
        self.load_ended_early_s: float | None = None
        self.outcomes: list[Outcome] = []
        self.samples: list[Sample] = []
        self.kills: list[KillEvent] = []
        self._lock = threading.Lock()
        self._next_index = 0
        self._stop = threading.Event()
        self._zero = time.monotonic()
        self._last_sampled = 0
        self.stopped_s = 0.0

    def _join_unless_skipped(self, threads: list[threading.Thread]) -> bool:
        """Wait for `threads` to end, or for the checks to be skipped; whether they all ended."""
        while any(thread.is_alive() for thread in threads):
            if self.skip_checks.wait(timeout=0.2):
                return False
        return True

    def interrupted(self) -> dict | None:
        """Where a signal cut the soak short (`report.summarize`); None for a soak that ran its course."""
        if self.load_ended_early_s is None and not self.skip_checks.is_set():
            return None
        return {"load_ended_at_min": (self.load_ended_early_s or self.stopped_s) / 60,
                "checks_skipped": self.skip_checks.is_set()}

    def outcomes_so_far(self) -> list[Outcome]:
        """The requests' outcomes as they stand (clients left in a request may still add theirs)."""
        with self._lock:
            return list(self.outcomes)

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
        from ...api.client import SpecCascadeClient

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
        routers = self.probe.routers()
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
            ttft_p50_s=percentile(ttfts, 0.5) if ttfts else None, router_active_sessions=router, tiers=tiers,
            routers=routers)
        self.samples.append(sample)
        self.console.print(progress_line(sample), soft_wrap=True)
        return sample

    def _kill_schedule(self) -> None:
        """Kill a replica of each of --kill-order in turn (Expert, Drafter, ...) every --kill-every
        seconds of the load."""
        rng = random.Random(f"{self.args.seed}:kills")
        order = tuple(getattr(self.args, "kill_order", None) or ("Expert", "Drafter"))
        number = 0
        while True:
            at = (number + 1) * self.args.kill_every
            if at >= self.args.minutes * 60 or self._stop.wait(timeout=max(0.0, at - self.now())):
                return
            deployment = order[number % len(order)]
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
                if self.end_load.wait(timeout=min(a.sample_every - self.now() % a.sample_every,
                                                  duration - self.now()) + 1e-3):
                    self.load_ended_early_s = self.now()
                    self.console.print(f"[{self.now() / 60:5.1f} min] stopping early: the load ends now, the settle "
                                       "and the fault-free replay follow (Ctrl-C again to skip them)")
                    self.sample("load")
                    break
                self.sample("load")
            else:  # the load ran its course: from now on a signal skips what follows
                self.end_load.set()
                self.console.print(f"[{self.now() / 60:5.1f} min] the load is over: the settle and the fault-free "
                                   "replay follow (Ctrl-C to skip them)")
        finally:
            self._stop.set()
            self.console.print(f"[{self.now() / 60:5.1f} min] clients stopping (finishing their requests)...")
            clients_done = self._join_unless_skipped(clients)
            if killer is not None:
                killer.join()
        self.stopped_s = self.now()
        if not clients_done:
            self.console.print(f"[{self.now() / 60:5.1f} min] clients still in a request are left to it; "
                               "what they answer from now on is not counted")
            return
        if self.skip_checks.wait(timeout=a.settle_s):
            self.console.print(f"[{self.now() / 60:5.1f} min] settle skipped: sessions left are not counted")
            return
        self.console.print(f"[{self.now() / 60:5.1f} min] {a.settle_s:g}s after the clients stopped:")
        self.sample("settled")

    def reference(self) -> dict:
        """Replay completed requests fault-free (same seeds, no cancels, deadlines or kills) and compare
        their tokens; requests that met a retry, a fallback or a resume are always among them. With
        --reference-repeats 2 the replay runs twice and the two are compared too: how often two
        fault-free runs differ (bf16 results depend on how requests were batched together)."""
        a = self.args
        if self.skip_checks.is_set():
            return {"compared": 0, "skipped": True}
        outcomes = self.outcomes_so_far()
        completed = {o.index: o for o in outcomes if o.status == "ok"}
        faulted = [i for i, o in completed.items() if o.tier_retries or o.expert_only_fallback or o.resumes]
        others = [i for i in completed if i not in set(faulted)]
        random.Random(f"{a.seed}:reference").shuffle(others)
        chosen = sorted((faulted + others)[: a.reference_limit]) if a.reference_limit else []
        if not chosen:
            return {"compared": 0}
        deadline = time.monotonic() + REPLAY_WAIT_S
        while True:  # a replica killed last may still be starting; a second Ctrl-C ends the wait
            try:
                self.probe.wait_until_running(timeout_s=1.0)
                break
            except TimeoutError:
                if self.skip_checks.is_set():
                    return {"compared": 0, "skipped": True}
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the service's replicas were not all running {REPLAY_WAIT_S:g}s after the "
                                       "load: no fault-free replay") from None
        replays = []
        for repeat in range(a.reference_repeats):
            if replays and self.skip_checks.is_set():
                break
            self.console.print(f"reference run {repeat + 1}/{a.reference_repeats}: {len(chosen)} completed requests "
                               f"replayed fault-free ({len(faulted)} of them met a retry, fallback or resume)...")
            replays.append(self._replay(chosen, repeat + 1))
        report = compare_with_reference({o.index: o.token_ids for o in outcomes if o.status == "ok"},
                                        replays[0], self.plan, outcomes)
        if self.skip_checks.is_set():  # cut short: what was compared stands, the rest is not counted
            report["skipped"] = True
        if len(replays) > 1:
            report["replay_vs_replay"] = compare_with_reference(
                {i: t for i, t in replays[1].items() if not isinstance(t, str)}, replays[0], self.plan)
        return report

    def _replay(self, indices: list[int], repeat: int) -> dict[int, list[int] | str]:
        """Tokens of each request run again to completion (or its error code), at --clients concurrency."""
        results: dict[int, list[int] | str] = {}
        queue = list(indices)

        def replay():
            from ...api.client import SpecCascadeClient

            with SpecCascadeClient(self.target, application=self.app) as client:
                while not self.skip_checks.is_set():
                    with self._lock:
                        if not queue:
                            return
                        index = queue.pop()
                    spec = RequestSpec(**{**asdict(self.plan(index)), "action": "complete", "unary": False})
                    outcome = run_request(client, spec, deadline_s=None, clock_zero=self._zero,
                                          request_id=f"soak-{self.args.seed}-{index}-replay{repeat}")
                    with self._lock:
                        results[index] = outcome.token_ids if outcome.status == "ok" else outcome.code

        threads = [threading.Thread(target=replay, daemon=True) for _ in range(self.args.clients)]
        for thread in threads:
            thread.start()
        if not self._join_unless_skipped(threads):
            self.console.print("replay cut short: the requests in flight are left to finish, not compared")
        with self._lock:  # a copy: threads still in a request may answer later, uncompared
            return dict(results)


def compare_with_reference(tokens_by_index: dict[int, list[int]], reference: dict[int, list[int] | str], plan,
                           outcomes: list[Outcome] = ()) -> dict:
    """Identical / compared, greedy and sampled apart, with the requests that differed (and, given
    the soak's outcomes, whether they met a retry, a fallback or a resume; `resumed`: the resumed
    requests among those compared)."""
    by_index = {o.index: o for o in outcomes}
    report = {"compared": 0, "reference_failed": [], "differed": [], "resumed": {"compared": 0, "identical": 0}}
    for sampling in SAMPLINGS:
        report[sampling] = {"compared": 0, "identical": 0}
    for index, expected in sorted(reference.items()):
        if isinstance(expected, str):
            report["reference_failed"].append({"index": index, "code": expected})
            continue
        if index not in tokens_by_index:
            continue
        got, spec = tokens_by_index[index], plan(index)
        resumed = index in by_index and by_index[index].resumes > 0
        report["compared"] += 1
        report[spec.sampling]["compared"] += 1
        report["resumed"]["compared"] += resumed
        if got == expected:
            report[spec.sampling]["identical"] += 1
            report["resumed"]["identical"] += resumed
            continue
        first = next((i for i, (x, y) in enumerate(zip(expected, got)) if x != y), min(len(expected), len(got)))
        differed = {"index": index, "label": spec.label, "first_difference_at": first, "tokens": len(got),
                    "reference_tokens": len(expected)}
        if index in by_index:
            differed |= {"tier_retries": by_index[index].tier_retries,
                         "expert_only_fallback": by_index[index].expert_only_fallback, "resumes": by_index[index].resumes}
        report["differed"].append(differed)
    return report


def progress_line(sample: Sample) -> str:
    def gib(deployment):
        return "+".join(f"{r.rss_bytes / (1 << 30):.2f}" for r in sample.memory(deployment)) or "-"

    def seconds(value):
        return f"{value:.1f}s" if value is not None else "-"

    def count(value):
        return "-" if value is None else value

    router = sample.router_active_sessions if sample.router_active_sessions is not None else "?"
    return (f"[{sample.t_s / 60:5.1f} min] ok {sample.ok} failed {sample.failed} cancelled {sample.cancelled} "
            f"deadline {sample.deadline} | p50 {seconds(sample.latency_p50_s)} p95 {seconds(sample.latency_p95_s)} "
            f"| RSS GiB router {gib('Router')} drafter {gib('Drafter')} expert {gib('Expert')} | sessions drafter "
            f"{count(sample.sessions('Drafter'))} expert {count(sample.sessions('Expert'))} router {router}")
