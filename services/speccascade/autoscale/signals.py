"""The autoscaling signals: cumulative counters that replicas report through Ray Serve's
`record_autoscaling_stats()`.

Only raw, monotonically increasing counts are reported (since the replica started). Ray Serve keeps
each replica's reported values as a time series over `look_back_period_s`; the policy turns the
increase of each counter over a window into rates and ratios, so any number of replicas aggregate
correctly and a replica restart (a counter reset) only loses the increase before the reset.

Router replicas report the decoding counters; drafter and expert replicas report the calls they
served and the compute seconds they spent on them. The same figures are Prometheus counters
exported by the tiers (`speccascade.tiers.metrics`, labelled by rule), e.g. the deferral rate the
policy sees is `sum(rate(ray_speccascade_deferred_positions_total[1m])) /
sum(rate(ray_speccascade_drafted_positions_total[1m]))`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

# Router counters.
ROUNDS = "rounds"  # draft-then-verify rounds
DRAFTED = "drafted"  # drafted positions
DEFERRED = "deferred"  # drafted positions where the rule deferred (r = 1)
SKIPPED_BLOCKS = "skipped_blocks"  # blocks emitted with no expert pass (chow)
ACCEPTED = "accepted"  # drafted tokens kept, including whole skipped blocks
SKIPPABLE_ROUNDS = "skippable_rounds"  # rounds under a rule that decides without p (chow)
ROUTER_COUNTERS = (ROUNDS, DRAFTED, DEFERRED, SKIPPED_BLOCKS, ACCEPTED, SKIPPABLE_ROUNDS)

# Router-side view of the tier calls it made (latency includes the RPC and any queueing).
DRAFTER_CALLS = "drafter_calls"
DRAFTER_SECONDS = "drafter_seconds"
EXPERT_CALLS = "expert_calls"
EXPERT_SECONDS = "expert_seconds"
ROUTER_CALL_COUNTERS = (DRAFTER_CALLS, DRAFTER_SECONDS, EXPERT_CALLS, EXPERT_SECONDS)

# Tier replica counters (drafter and expert replicas report these about themselves).
TIER_CALLS = "tier_calls"  # calls served
TIER_BUSY_SECONDS = "tier_busy_seconds"  # compute seconds spent serving them
TIER_COUNTERS = (TIER_CALLS, TIER_BUSY_SECONDS)


class SignalCounters:
    """Cumulative counters of one replica, returned as they are by `record_autoscaling_stats()`.
    Thread-safe: tier methods may run in Serve's thread pool."""

    def __init__(self, names: tuple[str, ...]):
        self._values = {name: 0.0 for name in names}
        self._lock = threading.Lock()

    def add(self, increments: Mapping[str, float]) -> None:
        with self._lock:
            for name, amount in increments.items():
                if name not in self._values:
                    raise KeyError(f"unknown autoscaling signal {name!r}; known: {sorted(self._values)}")
                if amount < 0:
                    raise ValueError(f"counter {name!r} cannot decrease (got increment {amount})")
                self._values[name] += amount

    def snapshot(self) -> dict[str, float]:
        """The values to return from `record_autoscaling_stats()`."""
        with self._lock:
            return dict(self._values)
