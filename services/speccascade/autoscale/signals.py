"""The autoscaling signals: cumulative counters that replicas report through Ray Serve's
`record_autoscaling_stats()`.

Only raw, monotonically increasing counts are reported (since the replica started). Ray Serve keeps
each replica's reported values as a time series over `look_back_period_s`; the policy turns the
increase of each counter over a window into rates and ratios, so any number of replicas aggregate
correctly and a replica restart (a counter reset) only loses the increase before the reset.

Router replicas report the decoding counters; drafter and expert replicas report the calls they
served and the compute seconds they spent on them. The same figures are Prometheus counters
exported by the tiers (`speccascade.serving.metrics`, labelled by rule), e.g. the deferral rate the
policy sees is `sum(rate(ray_speccascade_deferred_total[1m])) /
sum(rate(ray_speccascade_drafted_total[1m]))`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..engine.stats import COUNTER

# Router counters: the decoding loop's round counts (`speccascade.engine.stats.RoundCounts`, kept per
# window by the router's `WindowCounters`), under their own names: decoding rounds, drafted
# positions, deferred positions (r = 1), blocks emitted with no expert pass (chow), drafted tokens
# kept, rounds decided without p when the drafter is confident (chow), and the router's view of
# the tier calls it made (latency includes the RPC and any queueing).
ROUTER_COUNTERS = (COUNTER.rounds, COUNTER.drafted, COUNTER.deferred, COUNTER.skipped_blocks, COUNTER.accepted,
                   COUNTER.skippable_rounds, COUNTER.drafter_calls, COUNTER.drafter_seconds, COUNTER.expert_passes,
                   COUNTER.expert_seconds)

# Tier replica counters (drafter and expert replicas report these about themselves).
TIER_CALLS = "tier_calls"  # calls served
TIER_BUSY_SECONDS = "tier_busy_seconds"  # compute seconds spent serving them
TIER_COUNTERS = (TIER_CALLS, TIER_BUSY_SECONDS)
# A gauge, not a counter: the calls a tier replica holds at the moment it reports (queued or running),
# however they reached it. Serve counts only the calls that went through it as ongoing requests; with
# the direct transport most do not (`serving/direct.py`), so the queue floor reads this too.
TIER_IN_FLIGHT = "tier_in_flight_calls"
TIER_GAUGES = (TIER_IN_FLIGHT,)  # reported beside the counters, read as their latest value

# Why a tier's target is what the policy made it, as a closed set (a Prometheus label): a step
# towards the demand estimate, towards the floor the ongoing requests set, no change wanted, a
# target pulled back inside the bounds, or a change wanted while its delay runs.
REASON_KINDS = ("demand", "queue floor", "hold", "bounds", "waiting")


class CumulativeCounters:
    """Running totals of counters kept per window elsewhere (the router's `WindowCounters`, which a
    consumer drains with `take()`): `absorb` each drained window, and report the totals
    `including` the window still open, so what `record_autoscaling_stats()` returns only grows."""

    def __init__(self, names: tuple[str, ...]):
        self._totals = dict.fromkeys(names, 0.0)

    def absorb(self, window: Mapping[str, float]) -> None:
        for name in self._totals:
            self._totals[name] += float(window.get(name, 0.0))

    def including(self, window: Mapping[str, float]) -> dict[str, float]:
        return {name: total + float(window.get(name, 0.0)) for name, total in self._totals.items()}
