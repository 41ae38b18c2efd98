"""Trace-driven, discrete-event simulation of the served system under an autoscaling policy.

What is simulated: requests arrive (Poisson, rate from the trace) and each runs the cascade's
rounds until it has its tokens. A round is a drafter call (gamma draft steps), then - under
`chow` - an expert call only if some drafted position defers (each position defers with the
trace's deferral rate); a deferred position is rejected with probability `rejection`, which ends
the block at the first rejection; a verified block emits its accepted tokens + 1, a skipped one
gamma tokens. Each tier is a pool of replicas serving one call at a time from a shared FIFO queue,
with per-call service times measured on this machine (± `jitter`). A new replica serves only after
`startup_s`; one removed while busy finishes its call first; provisioned replicas are what costs.

The autoscaler is `replay.ControllerStandIn`: replicas record their counters every
min(0.2 x look-back, metrics interval) seconds and push them every metrics interval, handles
sample ongoing requests every second, and the policy runs every `tick_s`, as in Ray Serve.
Not modelled: batching inside a tier (max_batch_size 1), KV-cache misses, RPC time, the router.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from ...autoscale import signals as sig
from ...autoscale.settings import AutoscalingSettings
from ...engine.stats import COUNTER
from .replay import ControllerStandIn

DRAFTER, EXPERT, ROUTER = "drafter", "expert", "router"


# --------------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    """Piecewise-constant load and deferral rate: bin i covers [i, i + 1) x bin_s seconds."""

    bin_s: float
    request_rate: list[float]  # requests per second
    deferral: list[float]  # per-position deferral rate of the traffic in the bin
    name: str = "trace"

    @property
    def duration_s(self) -> float:
        return self.bin_s * len(self.request_rate)

    def at(self, t: float) -> tuple[float, float]:
        i = min(len(self.request_rate) - 1, max(0, int(t // self.bin_s)))
        return self.request_rate[i], self.deferral[i]


def _bump(hour: float, centre: float, width: float) -> float:
    return math.exp(-0.5 * ((hour - centre) / width) ** 2)


def synthetic_day(*, duration_s: float = 6 * 3600, bin_s: float = 60.0, peak_request_rate: float = 0.9,
                  seed: int = 0) -> Trace:
    """A working day compressed into `duration_s`: quiet night, morning and afternoon peaks, a
    smaller evening one, two short bursts; lenient batch traffic at night (low deferral),
    interactive traffic by day, and one afternoon stretch where a tenant's strict alpha drives the
    deferral rate up while the load does not change."""
    rng = random.Random(seed)
    bins = int(duration_s // bin_s)
    rates, deferrals = [], []
    for i in range(bins):
        hour = 24.0 * i / bins
        load = 0.08 + 0.95 * _bump(hour, 10.0, 2.0) + 0.85 * _bump(hour, 15.5, 2.2) + 0.45 * _bump(hour, 21.0, 1.3)
        if 11.8 <= hour < 12.0 or 19.0 <= hour < 19.15:
            load *= 2.2  # bursts
        rates.append(peak_request_rate * min(1.6, load) * (1.0 + 0.05 * rng.uniform(-1, 1)))
        deferral = 0.04 + 0.12 * _bump(hour, 12.0, 3.5)  # lenient at night, interactive by day
        if 13.0 <= hour < 17.0:
            deferral = 0.45  # a tenant with a strict alpha
        deferrals.append(deferral)
    return Trace(bin_s=bin_s, request_rate=rates, deferral=deferrals, name="synthetic day")


# --------------------------------------------------------------------------------------------
# Tiers
# --------------------------------------------------------------------------------------------

@dataclass
class Replica:
    ready_at: float
    busy: bool = False
    retiring: bool = False


@dataclass
class TierPool:
    name: str
    service_s: float
    replicas: list[Replica] = field(default_factory=list)
    queue: deque = field(default_factory=deque)  # (enqueued_at, round)
    waits: list[float] = field(default_factory=list)
    calls: int = 0
    busy_seconds: float = 0.0
    replica_seconds: float = 0.0
    last_cost_update: float = 0.0

    def provisioned(self) -> int:
        return len(self.replicas)

    def running(self, now: float) -> int:
        return sum(1 for r in self.replicas if r.ready_at <= now and not r.retiring)

    def ongoing(self) -> int:
        return len(self.queue) + sum(1 for r in self.replicas if r.busy)

    def account(self, now: float) -> None:
        self.replica_seconds += len(self.replicas) * (now - self.last_cost_update)
        self.last_cost_update = now


@dataclass
class Round:
    request: "Request"
    started: float
    drafter_wait: float = 0.0
    deferred: list[bool] | None = None  # per drafted position, once drafted


@dataclass
class Request:
    arrived: float
    tokens_left: int


@dataclass
class SimulationResult:
    policy: str
    label: str
    expert_replica_s: float
    drafter_replica_s: float
    expert_wait_p50_s: float
    expert_wait_p95_s: float
    expert_wait_p99_s: float
    expert_wait_mean_s: float
    drafter_wait_p95_s: float
    round_wait_p95_s: float  # drafter + expert queueing of one round
    expert_calls: int
    drafter_calls: int
    requests_done: int
    tokens: int
    timeline: dict[str, list[float]]  # per minute: time, provisioned expert/drafter, rate, deferral


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]


class Simulation:
    def __init__(self, trace: Trace, settings: AutoscalingSettings, *, drafter_call_s: float, expert_call_s: float,
                 block_size: int = 5, request_tokens: int = 128, rejection: float = 0.3, jitter: float = 0.1,
                 startup_s: float = 30.0, tick_s: float = 1.0, seed: int = 0, label: str | None = None):
        self.trace, self.settings = trace, settings
        self.gamma, self.request_tokens, self.rejection, self.jitter = block_size, request_tokens, rejection, jitter
        self.startup_s, self.tick_s = startup_s, tick_s
        self.label = label or settings.policy
        self.rng = random.Random(seed)
        self.arrival_rng = random.Random(seed + 1)  # the same arrivals under every policy
        names = settings.deployments
        self.names = {DRAFTER: names.drafter, EXPERT: names.expert, ROUTER: names.router}
        self.controller = ControllerStandIn(settings)
        self.pools = {DRAFTER: TierPool(DRAFTER, drafter_call_s), EXPERT: TierPool(EXPERT, expert_call_s)}
        for role, pool in self.pools.items():
            target = self.controller.records[self.names[role]].target
            pool.replicas = [Replica(ready_at=0.0) for _ in range(target)]
        self.router = {name: 0.0 for name in sig.ROUTER_COUNTERS}
        self.events: list = []
        self._seq = 0
        self.round_waits: list[float] = []
        self.active_requests = 0
        self.requests_done = 0
        self.tokens = 0
        self.timeline: dict[str, list[float]] = {k: [] for k in ("t", "expert", "drafter", "expert_target",
                                                                 "drafter_target", "request_rate", "deferral")}

    # -- events ------------------------------------------------------------------------------
    def _at(self, t: float, kind: str, payload=None) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, payload))

    def _service_time(self, pool: TierPool) -> float:
        return pool.service_s * (1.0 + self.jitter * self.rng.uniform(-1, 1))

    def _submit(self, pool: TierPool, now: float, rnd: Round) -> None:
        pool.queue.append((now, rnd))
        self._dispatch(pool, now)

    def _dispatch(self, pool: TierPool, now: float) -> None:
        for replica in pool.replicas:
            if not pool.queue:
                return
            if replica.busy or replica.retiring or replica.ready_at > now:
                continue
            enqueued, rnd = pool.queue.popleft()
            wait = now - enqueued
            pool.waits.append(wait)
            if pool.name == DRAFTER:
                rnd.drafter_wait = wait
            else:
                self.round_waits.append(rnd.drafter_wait + wait)
            replica.busy = True
            seconds = self._service_time(pool)
            pool.busy_seconds += seconds
            self._at(now + seconds, "done", (pool.name, replica, rnd))

    def _start_round(self, request: Request, now: float) -> None:
        self._submit(self.pools[DRAFTER], now, Round(request, now))

    def _drafted(self, rnd: Round, now: float) -> None:
        _, deferral = self.trace.at(now)
        deferred = [self.rng.random() < deferral for _ in range(self.gamma)]
        r = self.router
        r[COUNTER.rounds] += 1
        r[COUNTER.skippable_rounds] += 1
        r[COUNTER.drafted] += self.gamma
        r[COUNTER.deferred] += sum(deferred)
        if not any(deferred):
            r[COUNTER.skipped_blocks] += 1
            r[COUNTER.accepted] += self.gamma
            self.round_waits.append(rnd.drafter_wait)
            self._emit(rnd.request, self.gamma, now)
            return
        rnd.deferred = deferred
        self._submit(self.pools[EXPERT], now, rnd)

    def _verified(self, rnd: Round, now: float) -> None:
        accepted = 0
        for deferred in rnd.deferred:
            if deferred and self.rng.random() < self.rejection:
                break
            accepted += 1
        self.router[COUNTER.accepted] += accepted
        self._emit(rnd.request, accepted + 1, now)

    def _emit(self, request: Request, tokens: int, now: float) -> None:
        tokens = min(tokens, request.tokens_left)
        request.tokens_left -= tokens
        self.tokens += tokens
        if request.tokens_left > 0:
            self._start_round(request, now)
        else:
            self.active_requests -= 1
            self.requests_done += 1

    def _next_arrival(self, now: float) -> None:
        # Thinning over piecewise-constant rates: draw with the current bin's rate, redraw at
        # the bin edge if the arrival would fall past it (memorylessness makes this exact).
        t = now
        while t < self.trace.duration_s:
            rate, _ = self.trace.at(t)
            edge = (math.floor(t / self.trace.bin_s) + 1) * self.trace.bin_s
            gap = self.arrival_rng.expovariate(rate) if rate > 0 else math.inf
            if t + gap < edge:
                self._at(t + gap, "arrival")
                return
            t = edge

    # -- scaling -----------------------------------------------------------------------------
    def _scale(self, pool: TierPool, target: int, now: float) -> None:
        pool.account(now)
        live = [r for r in pool.replicas if not r.retiring]
        if target > len(live):
            pool.replicas.extend(Replica(ready_at=now + self.startup_s) for _ in range(target - len(live)))
            return
        excess = len(live) - target
        # Remove replicas still starting first, then idle ones, then busy ones (after their call).
        for replica in sorted(live, key=lambda r: (r.ready_at <= now, r.busy)):
            if excess == 0:
                break
            excess -= 1
            if replica.busy:
                replica.retiring = True
            else:
                pool.replicas.remove(replica)

    def _record(self, now: float, with_counters: bool) -> None:
        router_counters = dict(self.router) if with_counters else {}
        self.controller.record(self.names[ROUTER], now, router_counters, float(self.active_requests))
        for role, pool in self.pools.items():
            counters = {sig.TIER_CALLS: pool.calls, sig.TIER_BUSY_SECONDS: pool.busy_seconds} if with_counters else {}
            self.controller.record(self.names[role], now, counters, float(pool.ongoing()))

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> SimulationResult:
        settings = self.settings
        record_every = min(0.2 * settings.look_back_period_s, settings.metrics_interval_s)
        self._next_arrival(0.0)
        self._at(0.0, "tick")
        next_record, next_push, next_minute = 0.0, settings.metrics_interval_s, 0.0
        end = self.trace.duration_s
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if now > end:
                break
            if kind == "arrival":
                self.active_requests += 1
                self._start_round(Request(now, self.request_tokens), now)
                self._next_arrival(now)
            elif kind == "done":
                role, replica, rnd = payload
                pool = self.pools[role]
                pool.calls += 1
                replica.busy = False
                if replica.retiring:
                    pool.account(now)
                    pool.replicas.remove(replica)
                if role == DRAFTER:
                    self._drafted(rnd, now)
                else:
                    self._verified(rnd, now)
                self._dispatch(pool, now)
            elif kind == "ready":
                self._dispatch(self.pools[payload], now)
            elif kind == "tick":
                self._record(now, with_counters=now >= next_record)
                if now >= next_record:
                    next_record += record_every
                if now >= next_push:
                    self.controller.push(now)
                    next_push += settings.metrics_interval_s
                for role, pool in self.pools.items():
                    self.controller.set_running(self.names[role], pool.running(now))
                targets = self.controller.decide(now)
                for role, pool in self.pools.items():
                    before = len(pool.replicas)
                    self._scale(pool, targets[self.names[role]], now)
                    if len(pool.replicas) > before:
                        self._at(now + self.startup_s, "ready", role)
                if now >= next_minute:
                    self._sample_timeline(now, targets)
                    next_minute += 60.0
                self._at(now + self.tick_s, "tick")
        for pool in self.pools.values():
            pool.account(end)
        expert, drafter = self.pools[EXPERT], self.pools[DRAFTER]
        return SimulationResult(
            policy=settings.policy, label=self.label,
            expert_replica_s=expert.replica_seconds, drafter_replica_s=drafter.replica_seconds,
            expert_wait_p50_s=_percentile(expert.waits, 0.50), expert_wait_p95_s=_percentile(expert.waits, 0.95),
            expert_wait_p99_s=_percentile(expert.waits, 0.99),
            expert_wait_mean_s=sum(expert.waits) / len(expert.waits) if expert.waits else 0.0,
            drafter_wait_p95_s=_percentile(drafter.waits, 0.95), round_wait_p95_s=_percentile(self.round_waits, 0.95),
            expert_calls=expert.calls, drafter_calls=drafter.calls, requests_done=self.requests_done,
            tokens=self.tokens, timeline=self.timeline,
        )

    def _sample_timeline(self, now: float, targets: dict[str, int]) -> None:
        rate, deferral = self.trace.at(now)
        tl = self.timeline
        tl["t"].append(now)
        tl["expert"].append(self.pools[EXPERT].provisioned())
        tl["drafter"].append(self.pools[DRAFTER].provisioned())
        tl["expert_target"].append(targets[self.names[EXPERT]])
        tl["drafter_target"].append(targets[self.names[DRAFTER]])
        tl["request_rate"].append(rate)
        tl["deferral"].append(deferral)
