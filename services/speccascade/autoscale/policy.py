"""The deferral-aware application-level autoscaling policy for Ray Serve.

Ray Serve (>= 2.51) calls an application-level policy with one `AutoscalingContext` per autoscaling
deployment of the application and expects `({deployment_id: replicas}, {deployment_id: state})`.
`decide()` is that function, pure: everything it needs is in the contexts (the replicas' reported
counters in `ctx.raw_metrics`, ongoing requests in `ctx.total_num_requests`, the current target, the
bounds, the clock and its own state from the previous decision) and in the operator's
`AutoscalingSettings`. `DeferralAwarePolicy` is the class the Serve config names; Ray builds it
once with the settings as `policy_kwargs` and calls it every control-loop tick.

The formula
-----------
From the router's counters (see `signals.py`), the policy takes over the look-back window W
(`look_back_period_s`) the output-token rate, and over the shorter, most recent window w
(`deferral_window_s`) the ratios that describe how blocks go:

    T   = (accepted + rounds - skipped_blocks) / W       output tokens/s (demand)
    δ   = deferred / drafted                             deferral rate           (window w)
    γ   = drafted / rounds                               mean block size         (window w)
    f   = skippable_rounds / rounds                      share of rounds under `chow` (window w)
    a   = (accepted - γ·skipped_blocks) / (rounds - skipped_blocks)
                                                         accepted length of a verified block (w)

A block needs the expert unless no position defers. Under `chow` that is ≈ 1 − (1 − δ)^γ (exact
for independent positions; deferrals within a block are positively correlated, which makes an
all-confident block more likely, so this over-estimates the expert's share: the safe side). Rules
that need p to decide always call the expert, and there δ acts through the accepted length a:

    n   = f·(1 − (1 − δ)^γ) + (1 − f)                    expert calls per round
    τ   = (1 − n)·γ + n·(a + 1)                          output tokens per round
    R   = T / τ                                          rounds per second
    E   = R · n                                          expert calls per second
    D   = R · c_d                                        drafter calls per second (c_d calls/round)

Each tier's replica target is the work it must do divided by how busy a replica may be:

    expert  = E · s_e / u_e          drafter = D · s_d / u_d

where s is the tier's measured compute seconds per call (its replicas' `tier_busy_seconds /
tier_calls` over W; the router-side latency if the tier reports nothing; the last known value;
the operator's `service_time_s` before anything is measured) and u is `target_utilization`.
A change of δ moves n and τ within w, before the load rates over W have caught up, so the expert
is resized for a new deferral rate while the drafter (which R drives) holds.

Safety floor: each tier gets at least ⌈ongoing requests / queue_floor_ongoing_per_replica⌉
replicas (ongoing: the larger of Serve's count of requests in flight to the tier and the calls its
replicas last said they hold, which includes the direct transport's calls that Serve never sees),
and a scale-up the floor alone demands skips the upscale delay, so a burst that the rate signals
have not seen yet is never starved. The router is scaled on ongoing requests /
`target_ongoing_requests`, like Ray's own policy.

Turning a desired (fractional) count into the next target, per tier:
- scale up to ⌈desired⌉ once that has been wanted for `upscale_delay_s`;
- scale down to ⌈desired·(1 + hysteresis)⌉ once that has been wanted for `downscale_delay_s`
  (the margin keeps a demand hovering near an integer from flapping);
- move at most `max_step` replicas per step; while the same direction is still wanted, the next
  step follows one look-back window later (time for the signals to show the last step), or the
  delay if that is shorter;
- stay within [min_replicas, max_replicas] (Ray's capacity-adjusted bounds).
With no router counters yet (nothing reported), a tier holds its target, floor aside.

Ray wraps an application policy with the deployments' own `upscale_delay_s`/`downscale_delay_s`;
`settings.serve_autoscaling` sets those to 0 so the delays here are the only ones.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from ..engine.stats import COUNTER
from . import signals as sig
from .publish import DecisionPublisher
from .settings import AutoscalingSettings, TierScaling, settings_from_dict

log = logging.getLogger(__name__)

ROLES = ("router", "drafter", "expert")
_EPS = 1e-9


# --------------------------------------------------------------------------------------------
# Counters over a window
# --------------------------------------------------------------------------------------------

def counter_increase(series, since: float) -> tuple[float, float] | None:
    """(increase, seconds) of a cumulative counter from the last sample at or before `since`
    (or the first sample) to the last one. A drop is a reset: the new value is all increase."""
    if len(series) < 2:
        return None
    start = 0
    for i, point in enumerate(series):
        if point.timestamp <= since:
            start = i
        else:
            break
    points = series[start:]
    seconds = points[-1].timestamp - points[0].timestamp
    if len(points) < 2 or seconds <= 0:
        return None
    increase = 0.0
    for before, after in zip(points, points[1:]):
        increase += after.value - before.value if after.value >= before.value else after.value
    return increase, seconds


@dataclass(frozen=True)
class CounterWindow:
    """Counters of all replicas of a deployment over one window."""

    increases: dict[str, float]  # summed over replicas
    rates: dict[str, float]  # per second, summed over replicas

    def has(self, name: str) -> bool:
        return name in self.increases

    def increase(self, name: str) -> float:
        return self.increases.get(name, 0.0)

    def rate(self, name: str) -> float:
        return self.rates.get(name, 0.0)


def counter_window(ctx, since: float) -> CounterWindow:
    increases: dict[str, float] = {}
    rates: dict[str, float] = {}
    for name, by_replica in (ctx.raw_metrics or {}).items():
        if name in sig.TIER_GAUGES:
            continue
        for series in by_replica.values():
            measured = counter_increase(series, since)
            if measured is None:
                continue
            increase, seconds = measured
            increases[name] = increases.get(name, 0.0) + increase
            rates[name] = rates.get(name, 0.0) + increase / seconds
    return CounterWindow(increases, rates)


def latest_total(ctx, name: str) -> float:
    """A gauge's latest value, summed over the deployment's replicas (0 where none reported it)."""
    return sum(series[-1].value for series in (ctx.raw_metrics or {}).get(name, {}).values() if series)


# --------------------------------------------------------------------------------------------
# Demand
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Demand:
    """The inputs of a decision: what the router's counters say about load and deferral."""

    tokens_per_s: float  # T
    deferral_rate: float  # δ
    block_size: float  # γ
    skippable_share: float | None  # f (None: the router does not report it)
    accepted_length: float  # a, per verified block
    expert_calls_per_round: float  # n
    tokens_per_round: float  # τ
    rounds_per_s: float  # R
    expert_calls_per_s: float  # E
    drafter_calls_per_s: float  # D


def expert_calls_per_round(deferral_rate: float, block_size: float, skippable_share: float) -> float:
    """n = f·(1 − (1 − δ)^γ) + (1 − f)."""
    return skippable_share * (1.0 - (1.0 - deferral_rate) ** block_size) + (1.0 - skippable_share)


def tokens_per_round(expert_share: float, block_size: float, accepted_length: float) -> float:
    """τ = (1 − n)·γ + n·(a + 1): a skipped block emits γ tokens, a verified one a + 1."""
    return (1.0 - expert_share) * block_size + expert_share * (accepted_length + 1.0)


def estimate_demand(long: CounterWindow, short: CounterWindow, drafter_calls_per_round: float) -> Demand | None:
    """None when the router has reported no counters over the window (no signal, not no load)."""
    if not long.has(COUNTER.rounds):
        return None
    tokens_per_s = max(0.0, long.rate(COUNTER.accepted) + long.rate(COUNTER.rounds) - long.rate(COUNTER.skipped_blocks))
    ratios = short if short.increase(COUNTER.drafted) > 0 else long
    rounds = ratios.increase(COUNTER.rounds)
    drafted = ratios.increase(COUNTER.drafted)
    if rounds <= 0 or drafted <= 0:
        return Demand(tokens_per_s, 0.0, 0.0, None, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    deferral = min(1.0, ratios.increase(COUNTER.deferred) / drafted)
    gamma = drafted / rounds
    skipped = min(rounds, ratios.increase(COUNTER.skipped_blocks))
    verified = rounds - skipped
    accepted_length = (
        max(0.0, ratios.increase(COUNTER.accepted) - gamma * skipped) / verified if verified > 0 else gamma
    )
    if ratios.has(COUNTER.skippable_rounds):
        share = min(1.0, ratios.increase(COUNTER.skippable_rounds) / rounds)
        need = expert_calls_per_round(deferral, gamma, share)
    else:
        share = None
        need = verified / rounds  # without the rule mix, the observed share of verified rounds
    per_round = tokens_per_round(need, gamma, accepted_length)
    rounds_per_s = tokens_per_s / per_round if per_round > 0 else 0.0
    return Demand(
        tokens_per_s=tokens_per_s, deferral_rate=deferral, block_size=gamma, skippable_share=share,
        accepted_length=accepted_length, expert_calls_per_round=need, tokens_per_round=per_round,
        rounds_per_s=rounds_per_s, expert_calls_per_s=rounds_per_s * need,
        drafter_calls_per_s=rounds_per_s * drafter_calls_per_round,
    )


def measured_service_time(tier: CounterWindow, router: CounterWindow, calls_key: str, seconds_key: str) -> float | None:
    """Seconds per call: the tier's own compute time, else the router-side latency."""
    if tier.increase(sig.TIER_CALLS) > 0:
        return tier.increase(sig.TIER_BUSY_SECONDS) / tier.increase(sig.TIER_CALLS)
    if router.increase(calls_key) > 0:
        return router.increase(seconds_key) / router.increase(calls_key)
    return None


# --------------------------------------------------------------------------------------------
# From a desired count to the next target
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    replicas: int
    pending: str | None  # "up" / "down": the direction wanted, while it lasts
    pending_since: float | None  # since when it has been wanted
    stepped_at: float | None  # the last step of this run of same-direction steps
    reason: str  # for people, e.g. "demand: waiting 12s"
    kind: str  # one of signals.REASON_KINDS


def queue_floor(ongoing_requests: float, per_replica: float) -> int:
    return math.ceil(max(0.0, ongoing_requests) / per_replica - _EPS)


def next_target(
    desired: float, floor: int, target: int, lower: int, upper: int, scaling: TierScaling,
    pending: str | None, pending_since: float | None, stepped_at: float | None, now: float, settle_s: float,
) -> Step:
    """Apply bounds, hysteresis, delays and the step limit to a desired replica count.

    A run of steps in one direction starts once that direction has been wanted for its delay;
    while it is still wanted, the next step follows `settle_s` (one look-back window, so the
    signals reflect the previous step) or the delay, whichever is shorter."""
    def bounded(n: int) -> int:
        return max(lower, min(upper, n))

    if bounded(target) != target:
        return Step(bounded(target), None, None, None, "bounds", "bounds")
    up_to = bounded(max(math.ceil(desired - _EPS), floor))
    down_to = bounded(max(math.ceil(desired * (1.0 + scaling.hysteresis) - _EPS), floor))
    if up_to > target:
        direction, wanted = "up", up_to
        burst = bounded(floor) > target
        delay = 0.0 if burst else scaling.upscale_delay_s
        reason = "queue floor" if burst else "demand"
    elif down_to < target:
        direction, wanted, delay, reason = "down", down_to, scaling.downscale_delay_s, "demand"
    else:
        return Step(target, None, None, None, "hold", "hold")
    if pending != direction or pending_since is None:
        pending_since, stepped_at = now, None
    waited_since, wait = (pending_since, delay) if stepped_at is None else (stepped_at, min(delay, settle_s))
    if now - waited_since + 1e-6 < wait:
        return Step(target, direction, pending_since, stepped_at,
                    f"{reason}: waiting {wait - (now - waited_since):.0f}s", "waiting")
    change = max(-scaling.max_step, min(scaling.max_step, wanted - target))
    return Step(target + change, direction, pending_since, now, reason, reason)


# --------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------

def _roles(contexts: Mapping, settings: AutoscalingSettings) -> dict[str, object]:
    by_name = {ctx.deployment_name: (dep_id, ctx) for dep_id, ctx in contexts.items()}
    names = settings.deployments
    return {role: by_name[getattr(names, role)] for role in ROLES if getattr(names, role) in by_name}


def decide(contexts: Mapping, settings: AutoscalingSettings) -> tuple[dict, dict, dict]:
    """One decision: ({deployment_id: replicas}, {deployment_id: state}, record).

    `record` is a JSON-friendly account of the decision (per tier: current, previous target,
    desired and decided replicas, the floor, the service time, the reason; and the demand)."""
    roles = _roles(contexts, settings)
    now = next(iter(contexts.values())).current_time if contexts else time.time()
    now = now if now is not None else time.time()
    empty = CounterWindow({}, {})
    windows_long = {role: counter_window(ctx, now - settings.look_back_period_s) for role, (_, ctx) in roles.items()}
    router_long = windows_long.get("router", empty)
    router_short = counter_window(roles["router"][1], now - settings.deferral_window_s) if "router" in roles else empty
    drafter_long = windows_long.get("drafter", empty)
    drafter_per_round = 1.0
    if router_long.increase(COUNTER.rounds) > 0:
        drafter_calls = drafter_long.increase(sig.TIER_CALLS) or router_long.increase(COUNTER.drafter_calls)
        if drafter_calls > 0:
            drafter_per_round = drafter_calls / router_long.increase(COUNTER.rounds)
    demand = estimate_demand(router_long, router_short, drafter_per_round)

    decisions: dict = {}
    states: dict = {}
    record: dict = {"time": now, "policy": "deferral", "demand": asdict(demand) if demand else None, "tiers": {}}
    for role, (dep_id, ctx) in roles.items():
        scaling = settings.tier(role)
        state = dict(ctx.policy_state or {})
        ongoing = float(ctx.total_num_requests or 0.0)
        service_time = None
        if role == "router":
            desired = ongoing / scaling.target_ongoing_requests
            floor = 0
        else:
            calls_key, seconds_key = (
                (COUNTER.expert_passes, COUNTER.expert_seconds) if role == "expert" else (COUNTER.drafter_calls, COUNTER.drafter_seconds)
            )
            service_time = (
                measured_service_time(windows_long[role], router_long, calls_key, seconds_key)
                or state.get("service_time_s") or scaling.service_time_s
            )
            # Calls the replicas hold, whichever way they came (Serve sees only its own).
            ongoing = max(ongoing, latest_total(ctx, sig.TIER_IN_FLIGHT))
            floor = queue_floor(ongoing, scaling.queue_floor_ongoing_per_replica)
            if demand is None or service_time is None:
                desired = float(ctx.target_num_replicas)
            else:
                calls_per_s = demand.expert_calls_per_s if role == "expert" else demand.drafter_calls_per_s
                desired = calls_per_s * service_time / scaling.target_utilization
        step = next_target(
            desired, floor, ctx.target_num_replicas, ctx.capacity_adjusted_min_replicas,
            ctx.capacity_adjusted_max_replicas, scaling, state.get("pending"), state.get("pending_since"),
            state.get("stepped_at"), now, settings.look_back_period_s,
        )
        tier_record = {
            "deployment": ctx.deployment_name,
            "current_replicas": ctx.current_num_replicas,
            "previous_target": ctx.target_num_replicas,
            "target_replicas": step.replicas,
            "desired_replicas": round(desired, 4),
            "queue_floor": floor,
            "ongoing_requests": round(ongoing, 4),
            "service_time_s": service_time,
            "target_utilization": scaling.target_utilization,
            "reason": step.reason,
            "reason_kind": step.kind,
        }
        state.update(pending=step.pending, pending_since=step.pending_since, stepped_at=step.stepped_at,
                     decision=tier_record)
        if service_time is not None:
            state["service_time_s"] = service_time
        decisions[dep_id] = step.replicas
        states[dep_id] = state
        record["tiers"][role] = tier_record
    return decisions, states, record


class DeferralAwarePolicy:
    """The application-level policy Ray Serve instantiates from the Serve config:

        autoscaling_policy:
          policy_function: speccascade.autoscale.policy:DeferralAwarePolicy
          policy_kwargs: {<the operator's autoscaling settings>}
    """

    def __init__(self, **policy_kwargs):
        self.settings = settings_from_dict(policy_kwargs, source="autoscaling_policy.policy_kwargs")
        self._publisher = DecisionPublisher()
        self._warned_missing = False

    def __call__(self, contexts: Mapping) -> tuple[dict, dict]:
        decisions, states, record = decide(contexts, self.settings)
        missing = set(ROLES) - set(record["tiers"])
        if missing and not self._warned_missing:
            self._warned_missing = True
            present = sorted(ctx.deployment_name for ctx in contexts.values())
            log.warning("autoscaling: no autoscaling deployment for %s (configured names %s; autoscaling "
                        "deployments: %s); those tiers are not scaled by this policy",
                        sorted(missing), self.settings.deployments.model_dump(), present)
        app_name = next(iter(contexts.values())).app_name if contexts else None
        self._publisher.publish(record, app_name)
        return decisions, states
