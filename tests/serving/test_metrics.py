"""The tiers export their session caches: gauges as they are, counters by what changed since the
last sweep (the store's statistics are cumulative), so Prometheus sees each freed cache once."""

from __future__ import annotations

from collections import defaultdict

from speccascade.serving.metrics import TierMetrics
from speccascade.serving.sessions import CacheStats


class Recorder:
    def __init__(self):
        self.values = defaultdict(float)

    def set(self, value, tags):
        self.values[tuple(sorted(tags.items()))] = value

    def inc(self, value=1.0, tags=None):
        self.values[tuple(sorted(tags.items()))] += value


def recording_metrics() -> TierMetrics:
    metrics = TierMetrics("expert")
    for name in ("cached_sessions", "cache_bytes", "sessions_ended", "late_calls", "steps", "slot_evictions"):
        setattr(metrics, name, Recorder())
    return metrics


def stats(sessions=0, nbytes=0, evictions=0, released=0, reclaimed=0, late_calls=0) -> CacheStats:
    return CacheStats(sessions=sessions, nbytes=nbytes, evictions=evictions, misses=0, released=released,
                      reclaimed=reclaimed, late_calls=late_calls)


def ended(metrics: TierMetrics, how: str) -> float:
    return metrics.sessions_ended.values[(("how", how), ("tier", "expert"))]


def test_cache_counters_grow_by_what_changed_between_sweeps_and_gauges_follow_the_store():
    metrics = recording_metrics()
    metrics.observe_cache(stats(sessions=3, nbytes=4096, released=5, reclaimed=1, late_calls=2))
    metrics.observe_cache(stats(sessions=0, nbytes=0, released=9, reclaimed=1, evictions=2, late_calls=2))
    assert (ended(metrics, "released"), ended(metrics, "reclaimed"), ended(metrics, "evicted")) == (9, 1, 2)
    assert metrics.late_calls.values[(("tier", "expert"),)] == 2
    assert metrics.cached_sessions.values[(("tier", "expert"),)] == 0  # the last sweep's value, not a sum
    assert metrics.cache_bytes.values[(("tier", "expert"),)] == 0


def test_step_counters_grow_by_what_the_backend_counted_since_the_last_pass():
    metrics = recording_metrics()
    metrics.observe_steps({"graph": 3, "eager": 0, "wide": 1, "uncaptured": 0}, slot_evictions=0)
    metrics.observe_steps({"graph": 7, "eager": 0, "wide": 1, "uncaptured": 2}, slot_evictions=1)
    metrics.observe_steps({"graph": 7, "eager": 0, "wide": 1, "uncaptured": 2}, slot_evictions=1)
    steps = {dict(key)["how"]: value for key, value in metrics.steps.values.items()}
    assert steps == {"graph": 7, "wide": 1, "uncaptured": 2}  # kinds that never ran export nothing
    assert metrics.slot_evictions.values[(("tier", "expert"),)] == 1


def test_every_exported_metric_is_documented():
    """docs/metrics.md is the operator's list: a metric added to the code and not to it is invisible."""
    import re
    from pathlib import Path

    import speccascade
    from speccascade.engine.stats import COUNTER_HELP

    package = Path(speccascade.__file__).parent
    exported = {f"speccascade_{name}" for name in COUNTER_HELP}
    for module in ("serving/metrics.py", "autoscale/publish.py"):
        exported |= set(re.findall(r'"(speccascade_[a-z_]+)"', (package / module).read_text()))
    documented = set(re.findall(r"ray_(speccascade_[a-z_]+?)(?:_total|_bucket|_sum|_count)?`",
                                (package.parents[1] / "docs" / "metrics.md").read_text()))
    assert len(exported) > 30
    assert sorted(exported - documented) == []
