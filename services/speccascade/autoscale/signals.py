"""The autoscaling signals: cumulative counters that replicas report through Ray Serve's
`record_autoscaling_stats()`.

Only raw, monotonically increasing counts are reported (since the replica started). Ray Serve keeps
each replica's reported values as a time series over `look_back_period_s`; the policy turns the
increase of each counter over a window into rates and ratios, so any number of replicas aggregate
correctly and a replica restart (a counter reset) only loses the increase before the reset.

Router replicas report the decoding counters; drafter and expert replicas report the calls they
served and the compute seconds they spent on them. The same figures are Prometheus counters
exported by the tiers (`speccascade.tiers.metrics`, labelled by rule), e.g. the deferral rate the
policy sees is `sum(rate(ray_speccascade_deferred_total[1m])) /
sum(rate(ray_speccascade_drafted_total[1m]))`.
"""

from __future__ import annotations

from collections.abc import Mapping

# Router counters: the decoding loop's round counts (`speccascade.engine.stats.RoundCounts`, kept per
# window by the router's `WindowCounters`), under their own names.
ROUNDS = "rounds"  # decoding rounds
DRAFTED = "drafted"  # drafted positions
DEFERRED = "deferred"  # drafted positions where the rule deferred (r = 1)
SKIPPED_BLOCKS = "skipped_blocks"  # blocks emitted with no expert pass (chow)
ACCEPTED = "accepted"  # drafted tokens kept, including whole skipped blocks
SKIPPABLE_ROUNDS = "skippable_rounds"  # rounds decided without p when the drafter is confident (chow)
# The router's view of the tier calls it made (latency includes the RPC and any queueing).
DRAFTER_CALLS = "drafter_calls"
DRAFTER_SECONDS = "drafter_seconds"
EXPERT_CALLS = "expert_passes"
EXPERT_SECONDS = "expert_seconds"
ROUTER_COUNTERS = (ROUNDS, DRAFTED, DEFERRED, SKIPPED_BLOCKS, ACCEPTED, SKIPPABLE_ROUNDS,
                   DRAFTER_CALLS, DRAFTER_SECONDS, EXPERT_CALLS, EXPERT_SECONDS)

# Tier replica counters (drafter and expert replicas report these about themselves).
TIER_CALLS = "tier_calls"  # calls served
TIER_BUSY_SECONDS = "tier_busy_seconds"  # compute seconds spent serving them
TIER_COUNTERS = (TIER_CALLS, TIER_BUSY_SECONDS)


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
