"""Prometheus metrics of the served system (through `ray.serve.metrics`) and the router's
per-window raw counters for autoscaling.

Only raw counters and histograms are exported, all named `speccascade_*` and labelled by `rule`
where a request has one; Ray adds the `ray_` prefix, Prometheus the `_total` suffix of counters,
and Serve the `application`, `deployment` and `replica` labels. Rates are derived at query time,
so replicas aggregate correctly:

    # deferral rate: deferred drafted positions per drafted position
    sum by (rule) (rate(ray_speccascade_deferred_positions_total[5m]))
      / sum by (rule) (rate(ray_speccascade_drafted_positions_total[5m]))
    # acceptance rate: drafted tokens kept per drafted token
    sum by (rule) (rate(ray_speccascade_accepted_tokens_total[5m]))
      / sum by (rule) (rate(ray_speccascade_drafted_positions_total[5m]))
    # mean accepted length: drafted tokens kept per round
    sum by (rule) (rate(ray_speccascade_accepted_tokens_total[5m]))
      / sum by (rule) (rate(ray_speccascade_rounds_total[5m]))
    # share of blocks that skipped the expert (chow)
    sum(rate(ray_speccascade_skipped_blocks_total[5m])) / sum(rate(ray_speccascade_rounds_total[5m]))
    # output tokens per second, by source
    sum by (source) (rate(ray_speccascade_output_tokens_total[1m]))
    # p95 expert call latency seen by the router
    histogram_quantile(0.95, sum by (le) (rate(ray_speccascade_tier_call_seconds_bucket{tier="expert"}[5m])))
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from ray.serve.metrics import Counter, Histogram

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_SIZE_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128]


@dataclass
class WindowCounters:
    """Raw counts the router accumulated since the last `take()`: what an autoscaling policy
    needs to estimate each tier's demand (see DESIGN.md section 3)."""

    rounds: int = 0
    drafted_positions: int = 0
    deferred_positions: int = 0
    skipped_blocks: int = 0
    skippable_rounds: int = 0  # rounds under a rule that decides without the expert (chow)
    accepted_tokens: int = 0
    drafter_calls: int = 0
    expert_calls: int = 0
    drafter_service_seconds: float = 0.0
    expert_service_seconds: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    def take(self) -> "WindowCounters":
        """A copy of the counts so far; the window restarts empty."""
        snapshot = WindowCounters(**asdict(self))
        fresh = WindowCounters()
        for name, value in asdict(fresh).items():
            setattr(self, name, value)
        return snapshot

    def as_dict(self) -> dict[str, float]:
        out = asdict(self)
        out["window_seconds"] = time.monotonic() - out.pop("started_at")
        return out


class RouterMetrics:
    def __init__(self) -> None:
        rule = ("rule",)
        self.requests = Counter("speccascade_requests", "Generation requests finished, by status code.",
                                tag_keys=("rule", "code"))
        self.output_tokens = Counter("speccascade_output_tokens", "Output tokens, by the model that produced them.",
                                     tag_keys=("rule", "source"))
        self.rounds = Counter("speccascade_rounds", "Draft-then-verify rounds.", tag_keys=rule)
        self.drafted = Counter("speccascade_drafted_positions", "Tokens drafted.", tag_keys=rule)
        self.accepted = Counter("speccascade_accepted_tokens", "Drafted tokens kept.", tag_keys=rule)
        self.deferred = Counter("speccascade_deferred_positions", "Drafted positions deferred to the expert.",
                                tag_keys=rule)
        self.expert_passes = Counter("speccascade_expert_passes", "Expert verify calls.", tag_keys=rule)
        self.skipped_blocks = Counter("speccascade_skipped_blocks", "Blocks emitted without an expert call.",
                                      tag_keys=rule)
        self.fallbacks = Counter("speccascade_expert_only_fallbacks",
                                 "Requests decoded expert-only because the drafter tier was unavailable.",
                                 tag_keys=rule)
        self.tier_retries = Counter("speccascade_tier_retries", "Tier calls retried after a failure.",
                                    tag_keys=("tier",))
        self.wire_bytes = Counter("speccascade_wire_bytes", "Payload bytes exchanged with the tiers.", tag_keys=rule)
        self.tier_call_seconds = Histogram(
            "speccascade_tier_call_seconds", "Latency of tier calls as seen by the router.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("tier", "rule"),
        )


class TierMetrics:
    def __init__(self, tier: str) -> None:
        self.tags = {"tier": tier}
        self.batch_size = Histogram("speccascade_tier_batch_size", "Scoring requests per forward pass.",
                                    boundaries=BATCH_SIZE_BOUNDARIES, tag_keys=("tier",))
        self.forward_seconds = Histogram("speccascade_tier_forward_seconds", "Duration of batched forward passes.",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=("tier",))
        self.batches = 0
        self.batched_requests = 0
        self.busy_seconds = 0.0  # forward-pass seconds, for autoscaling (tier_busy_seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.batched_requests += size
        self.busy_seconds += seconds
        self.batch_size.observe(size, tags=self.tags)
        self.forward_seconds.observe(seconds, tags=self.tags)
