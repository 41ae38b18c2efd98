"""Prometheus metrics of the served system (through `ray.serve.metrics`) and the router's
per-window raw counters for autoscaling. Both observe the decoding loop's round records
(`engine.stats.RoundRecord`) under the record's own names.

Only raw counters and histograms are exported, all named `speccascade_*` and labelled by `tenant`
(the tenant id, never a key; empty without tenants), `method` and `rule` (empty for the baselines,
which have none); Ray adds the `ray_` prefix, Prometheus the
`_total` suffix of counters, and Serve the `application`, `deployment` and `replica` labels. Rates
are derived at query time, so replicas aggregate correctly:

    # deferral rate: deferred drafted positions per drafted position
    sum by (rule) (rate(ray_speccascade_deferred_total[5m]))
      / sum by (rule) (rate(ray_speccascade_drafted_total[5m]))
    # acceptance rate: drafted tokens kept per drafted token
    sum by (rule) (rate(ray_speccascade_accepted_total[5m]))
      / sum by (rule) (rate(ray_speccascade_drafted_total[5m]))
    # mean accepted length: drafted tokens kept per round
    sum by (rule) (rate(ray_speccascade_accepted_total[5m]))
      / sum by (rule) (rate(ray_speccascade_rounds_total[5m]))
    # share of blocks that skipped the expert (chow)
    sum(rate(ray_speccascade_skipped_blocks_total[5m])) / sum(rate(ray_speccascade_rounds_total[5m]))
    # output tokens per second, by source
    sum by (source) (rate(ray_speccascade_output_tokens_total[1m]))
    # p95 expert call latency seen by the router
    histogram_quantile(0.95, sum by (le) (rate(ray_speccascade_tier_call_seconds_bucket{tier="expert"}[5m])))
    # p95 time to first token, by rule
    histogram_quantile(0.95, sum by (le, rule) (rate(ray_speccascade_first_token_seconds_bucket[5m])))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

from ray.serve.metrics import Counter, Gauge, Histogram

from ..engine.request import GenerationRequest
from ..engine.stats import COUNTER_HELP, COUNTER_NAMES, GenerationStats, RoundCounts, RoundRecord, Source
from ..options import Method

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
# Whole requests run from tens of milliseconds (a few tokens on a GPU) to minutes (long outputs on CPUs).
REQUEST_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0]
BATCH_SIZE_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128]
REQUEST_TAGS = ("tenant", "method", "rule")

def metric_tags(request: GenerationRequest | None, tenant: str = "") -> dict[str, str]:
    """Labels of a request's metrics: its tenant (never a key), its method, and its rule when it
    decodes a cascade. A request refused before it was understood has only its tenant."""
    if request is None:
        return {"tenant": tenant, "method": "", "rule": ""}
    return {"tenant": tenant, "method": request.method.value,
            "rule": request.rule.value if request.method is Method.CASCADE else ""}


@dataclass
class WindowCounters(RoundCounts):
    """Round counts the router accumulated since the last `take()`: what an autoscaling policy
    needs to estimate each tier's demand (docs/autoscaling.md)."""

    started_at: float = field(default_factory=time.monotonic)

    def take(self) -> "WindowCounters":
        """A copy of the counts so far; the window restarts empty."""
        snapshot = WindowCounters(**{f.name: getattr(self, f.name) for f in fields(self)})
        fresh = WindowCounters()
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))
        return snapshot

    def as_dict(self) -> dict[str, float]:
        out = self.counts()
        out["window_seconds"] = time.monotonic() - self.started_at
        return out


class RouterMetrics:
    def __init__(self) -> None:
        self.requests = Counter("speccascade_requests", "Generation requests finished, by status code.",
                                tag_keys=(*REQUEST_TAGS, "code"))
        self.output_tokens = Counter("speccascade_output_tokens", "Output tokens, by the model that produced them.",
                                     tag_keys=(*REQUEST_TAGS, "source"))
        self.rounds = Counter("speccascade_rounds", COUNTER_HELP["rounds"],
                              tag_keys=REQUEST_TAGS)
        self.round_counters = {name: Counter(f"speccascade_{name}", COUNTER_HELP[name], tag_keys=REQUEST_TAGS)
                               for name in COUNTER_NAMES}
        self.rejections = Counter("speccascade_rejections", "Requests refused by tenancy, by reason "
                                  "(unauthenticated, disabled, policy, concurrency, tokens_per_minute, resume_tenant).",
                                  tag_keys=("tenant", "reason"))
        self.quota_ledger_unreachable = Counter(
            "speccascade_quota_ledger_unreachable", "Admissions the shared quota ledger did not answer in time, by "
            "what was done (mode open: admitted by the router replica's own count; closed: refused).",
            tag_keys=("mode",))
        self.resumed = Counter("speccascade_resumed_requests", "Streams continued from a resume token (a client "
                               "whose stream broke off sent it back), by tenant.", tag_keys=("tenant",))
        self.tenant_reloads = Counter("speccascade_tenant_reloads", "Changes of the tenants file seen, by result "
                                      "(ok: applied; error: refused, the last good tenants stay).",
                                      tag_keys=("result",))
        self.fallbacks = Counter("speccascade_expert_only_fallbacks",
                                 "Requests decoded expert-only because the drafter tier was unavailable.",
                                 tag_keys=("rule",))
        self.tier_retries = Counter("speccascade_tier_retries", "Tier calls retried after a failure.",
                                    tag_keys=("tier",))
        self.tier_busy_waits = Counter(
            "speccascade_tier_busy_waits", "Times a tier call outlived tier_call_timeout_s on a replica that was "
            "still running passes (overloaded, not stuck), so it kept waiting instead of being retried.",
            tag_keys=("tier",))
        self.context_resends = Counter("speccascade_context_resends", "Tier calls sent again with the whole "
                                       "sequence because the replica did not hold the one the call built on "
                                       "(the session moved replicas, or its cache was evicted).", tag_keys=("tier",))
        self.tier_call_seconds = Histogram(
            "speccascade_tier_call_seconds", "Latency of tier calls as seen by the router.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("tier", "rule"),
        )
        self.request_seconds = Histogram(
            "speccascade_request_seconds", "Duration of requests decoded to the end (gRPC and HTTP).",
            boundaries=REQUEST_BOUNDARIES_S, tag_keys=REQUEST_TAGS,
        )
        self.first_token_seconds = Histogram(
            "speccascade_first_token_seconds", "Time from the start of a request's decoding to its first output token.",
            boundaries=REQUEST_BOUNDARIES_S, tag_keys=REQUEST_TAGS,
        )

    def observe(self, record: RoundRecord, tags: dict[str, str]) -> None:
        self.rounds.inc(tags=tags)
        for name, counter in self.round_counters.items():
            value = getattr(record, name)
            if value:
                counter.inc(value, tags=tags)

    def observe_output(self, stats: GenerationStats, tags: dict[str, str]) -> None:
        """Output tokens are counted once the request's output is final (tokens past a stop are not)."""
        for source, value in ((Source.DRAFTER, stats.tokens_from_drafter), (Source.EXPERT, stats.tokens_from_expert)):
            if value:
                self.output_tokens.inc(value, tags={**tags, "source": source.value})


def _grow(counter, now: int, before: int, tags: dict[str, str]) -> None:
    """Count what a cumulative figure gained since it was last exported."""
    if now > before:
        counter.inc(now - before, tags=tags)


class TierMetrics:
    def __init__(self, tier: str) -> None:
        self.tags = {"tier": tier}
        self.batch_size = Histogram("speccascade_tier_batch_size", "Scoring requests per forward pass.",
                                    boundaries=BATCH_SIZE_BOUNDARIES, tag_keys=("tier",))
        self.forward_seconds = Histogram("speccascade_tier_forward_seconds", "Duration of batched forward passes.",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=("tier",))
        self.cached_sessions = Gauge("speccascade_tier_cached_sessions",
                                     "Session caches held by the replica (requests in flight, or not yet released).",
                                     tag_keys=("tier",))
        self.cache_bytes = Gauge("speccascade_tier_cache_bytes", "Bytes held by the replica's session caches.",
                                 tag_keys=("tier",))
        self.sessions_ended = Counter("speccascade_tier_sessions_ended",
                                      "Session caches freed, by how: released by the router at the request's end, "
                                      "reclaimed after the idle timeout (its router gone), evicted for the memory budget.",
                                      tag_keys=("tier", "how"))
        self.late_calls = Counter("speccascade_tier_late_calls",
                                  "Calls refused because their session had already been released (a release that "
                                  "overtook a call in flight).", tag_keys=("tier",))
        self.context_resends = Counter("speccascade_tier_context_resends", "Calls answered with a request for the "
                                       "whole sequence (this replica did not hold the one the call built on).",
                                       tag_keys=("tier",))
        self.prefill_tokens = Counter("speccascade_tier_prefill_tokens", "Context tokens prefilled in chunks apart "
                                      "from the decode batches.", tag_keys=("tier",))
        self.prefill_chunk_seconds = Histogram("speccascade_tier_prefill_chunk_seconds",
                                               "Duration of prefill passes (a running stream waits for at most one).",
                                               boundaries=LATENCY_BOUNDARIES_S, tag_keys=("tier",))
        self.steps = Counter("speccascade_tier_steps", "Forward passes by how they ran: graph (a captured CUDA graph "
                             "replayed), eager (no graphs on this backend or device), wide (a prefill chunk wider "
                             "than any graph), uncaptured (a decode or verify step whose shape was not captured: "
                             "an eager fallback).", tag_keys=("tier", "how"))
        self.slot_evictions = Counter("speccascade_tier_slot_evictions", "Sessions that lost their static-backend "
                                      "slot to another (all slots in use); each recomputes its context.",
                                      tag_keys=("tier",))
        self._last_steps: dict[str, int] = {}
        self._last_slot_evictions = 0
        self._last_cache_stats = None
        self.batches = 0
        self.batched_requests = 0
        self.busy_seconds = 0.0  # forward-pass seconds, for autoscaling (tier_busy_seconds)

    def observe_cache(self, stats) -> None:
        """Export the session store's statistics (`sessions.CacheStats`, cumulative counts): the
        gauges as they are, the counters by what changed since the last observation."""
        self.cached_sessions.set(stats.sessions, tags=self.tags)
        self.cache_bytes.set(stats.nbytes, tags=self.tags)
        last = self._last_cache_stats
        for how, field_name in (("released", "released"), ("reclaimed", "reclaimed"), ("evicted", "evictions")):
            _grow(self.sessions_ended, getattr(stats, field_name), getattr(last, field_name) if last else 0,
                  {**self.tags, "how": how})
        _grow(self.late_calls, stats.late_calls, last.late_calls if last else 0, self.tags)
        self._last_cache_stats = stats

    def observe_steps(self, steps: dict[str, int], slot_evictions: int) -> None:
        """Export the backend's cumulative step kinds and slot evictions by what changed since the
        last observation."""
        for how, count in steps.items():
            _grow(self.steps, count, self._last_steps.get(how, 0), {**self.tags, "how": how})
        _grow(self.slot_evictions, slot_evictions, self._last_slot_evictions, self.tags)
        self._last_steps, self._last_slot_evictions = dict(steps), slot_evictions

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self.busy_seconds += seconds
        self.prefill_tokens.inc(tokens, tags=self.tags)
        self.prefill_chunk_seconds.observe(seconds, tags=self.tags)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.batched_requests += size
        self.busy_seconds += seconds
        self.batch_size.observe(size, tags=self.tags)
        self.forward_seconds.observe(seconds, tags=self.tags)
