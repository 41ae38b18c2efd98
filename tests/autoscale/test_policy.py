"""The deferral-aware policy, stepped through Ray Serve AutoscalingContexts with no cluster."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from ray.serve._private.common import TimeStampedValue
from speccascade.autoscale import signals as sig
from speccascade.autoscale.policy import (
    DeferralAwarePolicy,
    counter_increase,
    counter_window,
    estimate_demand,
    expert_calls_per_round,
)
from speccascade.autoscale.settings import settings_from_dict
from speccascade.bench.autoscale.replay import ControllerStandIn, make_context
from speccascade.engine.stats import COUNTER

GAMMA = 5
EXPERT_S = 0.2  # seconds per expert verify call
DRAFTER_S = 0.45  # seconds per draft call (gamma steps)


def series(*points):
    return [TimeStampedValue(t, v) for t, v in points]


@dataclass
class Traffic:
    """Router and tier counters of a served system in steady state: `tokens_per_s` output tokens
    under `chow` with per-position deferral rate `deferral`; a deferred position is rejected with
    probability `rejection` (its total-variation distance)."""

    tokens_per_s: float
    deferral: float
    rejection: float = 0.3
    chow_share: float = 1.0

    def per_round(self):
        need = expert_calls_per_round(self.deferral, GAMMA, self.chow_share)
        keep = 1 - self.deferral * self.rejection
        accepted_verified = sum(keep ** k for k in range(1, GAMMA + 1))
        tokens = (1 - need) * GAMMA + need * (accepted_verified + 1)
        return need, accepted_verified, tokens

    def rates(self) -> dict[str, dict[str, float]]:
        need, accepted_verified, tokens = self.per_round()
        rounds = self.tokens_per_s / tokens
        skipped = rounds * (1 - need)
        expert_calls = rounds * need
        router = {
            COUNTER.rounds: rounds, COUNTER.drafted: rounds * GAMMA, COUNTER.deferred: rounds * GAMMA * self.deferral,
            COUNTER.skipped_blocks: skipped, COUNTER.accepted: skipped * GAMMA + expert_calls * accepted_verified,
            COUNTER.skippable_rounds: rounds * self.chow_share,
        }
        return {
            "Router": router,
            "Drafter": {sig.TIER_CALLS: rounds, sig.TIER_BUSY_SECONDS: rounds * DRAFTER_S},
            "Expert": {sig.TIER_CALLS: expert_calls, sig.TIER_BUSY_SECONDS: expert_calls * EXPERT_S},
        }

    def ongoing(self) -> dict[str, float]:  # Little's law with no queueing
        r = self.rates()
        return {"Router": 1.0, "Drafter": r["Drafter"][sig.TIER_BUSY_SECONDS],
                "Expert": r["Expert"][sig.TIER_BUSY_SECONDS]}


SETTINGS = {
    "look_back_period_s": 30, "deferral_window_s": 10, "metrics_interval_s": 2,
    "drafter": {"min_replicas": 1, "max_replicas": 20, "target_utilization": 0.7, "upscale_delay_s": 20,
                "downscale_delay_s": 60, "max_step": 2, "queue_floor_ongoing_per_replica": 4},
    "expert": {"min_replicas": 1, "max_replicas": 12, "target_utilization": 0.7, "upscale_delay_s": 20,
               "downscale_delay_s": 60, "max_step": 2, "queue_floor_ongoing_per_replica": 4},
}


class Cluster:
    """Drives a ControllerStandIn one second at a time with the counters of `traffic`."""

    def __init__(self, settings=None, initial=None):
        self.controller = ControllerStandIn(settings_from_dict(settings or SETTINGS), initial=initial)
        self.now = 0.0
        self.totals = {name: {} for name in ("Router", "Drafter", "Expert")}
        self.history: list[tuple[float, dict[str, int]]] = []

    def run(self, traffic: Traffic, seconds: int, ongoing_override: dict[str, float] | None = None,
            gauges: dict[str, dict[str, float]] | None = None):
        push_every = self.controller.settings.metrics_interval_s
        for _ in range(seconds):
            self.now += 1.0
            ongoing = {**traffic.ongoing(), **(ongoing_override or {})}
            for name, rates in traffic.rates().items():
                totals = self.totals[name]
                for key, rate in rates.items():
                    totals[key] = totals.get(key, 0.0) + rate
                self.controller.record(name, self.now, {**totals, **(gauges or {}).get(name, {})}, ongoing[name])
            if self.now % push_every == 0:
                self.controller.push(self.now)
            for name, rec in self.controller.records.items():
                self.controller.set_running(name, rec.target)  # replicas start instantly here
            self.history.append((self.now, dict(self.controller.decide(self.now))))
        return self.targets

    @property
    def targets(self) -> dict[str, int]:
        return {name: rec.target for name, rec in self.controller.records.items()}

    def changes(self, name: str, since: float = -1.0) -> list[tuple[float, int]]:
        out, last = [], None
        for t, targets in self.history:
            if last is not None and targets[name] != last and t > since:
                out.append((t, targets[name]))
            last = targets[name]
        return out


def steady_targets(traffic: Traffic, utilisation: float = 0.7) -> dict[str, int]:
    rates = traffic.rates()
    return {
        "Router": 1,
        "Drafter": math.ceil(rates["Drafter"][sig.TIER_BUSY_SECONDS] / utilisation),
        "Expert": math.ceil(rates["Expert"][sig.TIER_BUSY_SECONDS] / utilisation),
    }


# --- counters and demand ----------------------------------------------------------------------

def test_counter_increase_over_window_and_reset():
    s = series((0, 0), (10, 5), (20, 30), (30, 40))
    assert counter_increase(s, since=-1) == (40, 30)
    assert counter_increase(s, since=20) == (10, 10)  # from the sample at 20
    assert counter_increase(s, since=15) == (35, 20)  # from the last sample before 15
    restarted = series((0, 100), (10, 110), (20, 4), (30, 9))  # the replica restarted after 10 s
    assert counter_increase(restarted, since=-1) == (10 + 4 + 5, 30)
    assert counter_increase(series((0, 1)), since=-1) is None


def test_expert_calls_per_round_formula():
    assert expert_calls_per_round(0.0, 5, 1.0) == 0.0
    assert expert_calls_per_round(1.0, 5, 1.0) == 1.0
    assert expert_calls_per_round(0.1, 5, 1.0) == pytest.approx(1 - 0.9 ** 5)
    assert expert_calls_per_round(0.1, 5, 0.0) == 1.0  # rules that need p always call the expert
    assert expert_calls_per_round(0.1, 5, 0.5) == pytest.approx(0.5 * (1 - 0.9 ** 5) + 0.5)


@pytest.mark.parametrize("deferral", [0.02, 0.3])
def test_demand_recovers_the_traffic_that_made_the_counters(deferral):
    traffic = Traffic(tokens_per_s=50.0, deferral=deferral)
    cluster = Cluster()
    cluster.run(traffic, 40)
    rec = cluster.controller.records["Router"]
    ctx = make_context("Router", target=1, running=1, raw_metrics=rec.samples, ongoing_requests=0.0,
                       config=rec.config, policy_state={}, now=cluster.now)
    demand = estimate_demand(counter_window(ctx, cluster.now - 30), counter_window(ctx, cluster.now - 10), 1.0)
    rates = traffic.rates()
    assert demand.tokens_per_s == pytest.approx(50.0, rel=1e-6)
    assert demand.deferral_rate == pytest.approx(deferral, rel=1e-6)
    assert demand.rounds_per_s == pytest.approx(rates["Router"][COUNTER.rounds], rel=1e-6)
    assert demand.expert_calls_per_s == pytest.approx(rates["Expert"][sig.TIER_CALLS], rel=1e-6)


# --- stepping the policy ----------------------------------------------------------------------

def test_steady_traffic_sizes_each_tier_for_its_utilisation_target():
    traffic = Traffic(tokens_per_s=60.0, deferral=0.1)
    cluster = Cluster(initial={"Router": 1, "Drafter": 1, "Expert": 1})
    cluster.run(traffic, 200)
    assert cluster.targets == steady_targets(traffic)


def test_deferral_rising_scales_the_expert_up_while_the_drafter_holds():
    lenient, strict = Traffic(tokens_per_s=60.0, deferral=0.03), Traffic(tokens_per_s=60.0, deferral=0.4)
    cluster = Cluster(initial=steady_targets(lenient))
    before = cluster.run(lenient, 90)
    assert before == steady_targets(lenient)
    switch = cluster.now
    after = cluster.run(strict, 120)
    assert after["Expert"] >= before["Expert"] + 3
    assert after["Expert"] == steady_targets(strict)["Expert"]
    # The drafter follows the round rate: more rejections mean ~12% more rounds for the same
    # tokens, against 4x the expert's work.
    assert abs(after["Drafter"] - before["Drafter"]) <= 1
    assert after["Drafter"] == steady_targets(strict)["Drafter"]
    steps = cluster.changes("Expert", since=switch)
    assert steps[0][0] - switch >= 20  # not before the upscale delay
    previous = before["Expert"]
    for _, replicas in steps:
        assert 0 < replicas - previous <= 2  # max_step
        previous = replicas


def test_deferral_falling_scales_the_expert_down_only_after_the_delay():
    strict, lenient = Traffic(tokens_per_s=60.0, deferral=0.4), Traffic(tokens_per_s=60.0, deferral=0.03)
    cluster = Cluster(initial=steady_targets(strict))
    before = cluster.run(strict, 60)
    switch = cluster.now
    cluster.run(lenient, 55)
    assert cluster.targets["Expert"] == before["Expert"]  # still within the 60 s downscale delay
    expert = cluster.controller.last_record["tiers"]["expert"]
    assert expert["reason_kind"] == "waiting" and expert["reason"].startswith("demand: waiting")
    cluster.run(lenient, 300)
    assert cluster.targets["Expert"] == steady_targets(lenient)["Expert"]
    assert cluster.targets["Drafter"] == before["Drafter"]
    steps = cluster.changes("Expert", since=switch)
    assert steps[0][0] - switch >= 60
    for (t0, _), (t1, _) in zip(steps, steps[1:]):
        assert t1 - t0 >= 30  # further steps of the run wait one look-back window


def test_burst_of_ongoing_requests_raises_the_floor_without_waiting():
    traffic = Traffic(tokens_per_s=30.0, deferral=0.1)
    cluster = Cluster(initial=steady_targets(traffic))
    before = cluster.run(traffic, 60)
    switch = cluster.now
    # A burst the rate signals have not seen: 40 calls in flight at the expert. Ray averages
    # ongoing requests over the look-back window, so the floor climbs as the burst goes on.
    cluster.run(traffic, 40, ongoing_override={"Expert": 40.0})
    steps = cluster.changes("Expert", since=switch)
    assert steps, "the floor must raise the expert"
    assert steps[0][0] - switch < 20  # sooner than the 20 s upscale delay
    assert steps[0][1] - before["Expert"] <= 2  # still one max_step at a time
    assert cluster.controller.last_record["tiers"]["expert"]["queue_floor"] == 10  # 40 / 4 per replica
    assert cluster.controller.last_record["tiers"]["expert"]["reason"] in ("queue floor", "hold")
    assert cluster.targets["Expert"] == 10
    assert cluster.targets["Drafter"] == before["Drafter"]


def test_calls_serve_never_saw_raise_the_floor_as_its_own_ongoing_requests_do():
    """With the direct transport a session's calls after its first bypass Serve, whose count of
    ongoing requests then misses them; the replicas' own in-flight gauge does not."""
    traffic = Traffic(tokens_per_s=30.0, deferral=0.1)
    cluster = Cluster(initial=steady_targets(traffic))
    before = cluster.run(traffic, 60)
    cluster.run(traffic, 40, gauges={"Expert": {sig.TIER_IN_FLIGHT: 40.0}})
    expert = cluster.controller.last_record["tiers"]["expert"]
    assert expert["queue_floor"] == 10 and expert["ongoing_requests"] == 40.0
    assert cluster.targets["Expert"] == 10 and cluster.targets["Drafter"] == before["Drafter"]


def test_the_in_flight_gauge_is_read_as_its_latest_value_and_never_as_a_counter():
    from speccascade.autoscale.policy import latest_total

    config = Cluster().controller.records["Expert"].config
    gauge = series((0, 9), (10, 3))
    context = make_context("Expert", target=2, running=2, raw_metrics={sig.TIER_IN_FLIGHT: gauge},
                           ongoing_requests=0.0, config=config, policy_state={}, now=10.0)
    assert latest_total(context, sig.TIER_IN_FLIGHT) == 3
    assert latest_total(context, sig.TIER_CALLS) == 0
    assert not counter_window(context, since=-1).has(sig.TIER_IN_FLIGHT)


def test_bounds_cap_a_huge_demand_and_idle_goes_to_min_replicas():
    settings = {**SETTINGS, "expert": {**SETTINGS["expert"], "max_replicas": 5, "max_step": 10,
                                       "upscale_delay_s": 0}}
    cluster = Cluster(settings=settings, initial={"Router": 1, "Drafter": 1, "Expert": 1})
    cluster.run(Traffic(tokens_per_s=1000.0, deferral=0.9), 30)
    assert cluster.targets["Expert"] == 5
    assert cluster.targets["Drafter"] == 20
    cluster.run(Traffic(tokens_per_s=0.0, deferral=0.0), 60 + 30 * 10)  # the delay, then 2 replicas per 30 s
    assert cluster.targets == {"Router": 1, "Drafter": 1, "Expert": 1}


def test_no_router_signal_holds_the_targets():
    cluster = Cluster(initial={"Router": 1, "Drafter": 3, "Expert": 2})
    for t in range(1, 100):
        cluster.controller.push(float(t))
        cluster.controller.decide(float(t))
    assert cluster.targets == {"Router": 1, "Drafter": 3, "Expert": 2}


def test_hysteresis_keeps_a_demand_just_below_an_integer_from_scaling_down():
    # Expert demand 2.9 replicas: the target 3 holds (2.9 x 1.1 > 2), and at 2.7 it still holds
    # while a demand of 1.7 replicas goes to 2.
    for busy_replicas, expected in ((2.9, 3), (2.7, 3), (1.7, 2)):
        tokens = 60.0
        probe = Traffic(tokens_per_s=tokens, deferral=0.2).rates()["Expert"][sig.TIER_BUSY_SECONDS] / 0.7
        traffic = Traffic(tokens_per_s=tokens * busy_replicas / probe, deferral=0.2)
        cluster = Cluster(initial={"Router": 1, "Drafter": steady_targets(traffic)["Drafter"], "Expert": 3})
        cluster.run(traffic, 400)
        assert cluster.targets["Expert"] == expected, busy_replicas


def test_policy_object_is_what_ray_calls():
    policy = DeferralAwarePolicy(**settings_from_dict(SETTINGS).model_dump(mode="json"))
    cluster = Cluster()
    cluster.run(Traffic(tokens_per_s=60.0, deferral=0.1), 40)
    contexts = {}
    for rec in cluster.controller.records.values():
        ctx = make_context(rec.name, target=1, running=1, raw_metrics=rec.samples, ongoing_requests=0.0,
                           config=rec.config, policy_state={}, now=cluster.now)
        contexts[ctx.deployment_id] = ctx
    decisions, states = policy(contexts)
    assert set(decisions) == set(contexts) == set(states)
    assert all(isinstance(n, int) and n >= 1 for n in decisions.values())
    expert = next(d for d in contexts if d.name == "Expert")
    assert states[expert]["decision"]["service_time_s"] == pytest.approx(EXPERT_S)
    assert states[expert]["pending"] == "up"  # 1 replica is too few, waiting out the delay
    assert states[expert]["decision"]["reason_kind"] == "waiting"
    assert {s["decision"]["reason_kind"] for s in states.values()} <= set(sig.REASON_KINDS)
