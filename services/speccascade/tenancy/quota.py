"""Per-tenant quotas in a router replica: concurrent requests, and output tokens per minute.

Output tokens are metered by a token bucket: it refills at N/60 tokens a second up to a burst of
N/20 (three seconds' worth, so a two-minute run cannot exceed its rate by more than 2.5 %), a request
is admitted while the bucket is not empty, and its tokens are charged as they are produced, so a
long answer may run the bucket into debt, which later requests wait out. Over T seconds a
saturating tenant gets N·T/60 plus at most the burst and what its requests in flight produce.
Refusals carry how long to wait (`QuotaExceeded.retry_after_s`).

This is the bookkeeping of one place. With several router replicas the application keeps it in
one ledger they share (`ledger.py`), so the limits hold for the application as a whole; a router
replica keeps a local one only when told to (`tenancy.quota_scope: replica`) or, with
`tenancy.quota_ledger_unreachable: open`, while the shared ledger does not answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .tenants import TenancyError, Tenant, TenantLimits

RETRY_AFTER_HEADER = "retry-after-ms"  # gRPC trailing metadata and HTTP header of a refusal: when to try again
BURST_SECONDS = 3.0  # the bucket holds this many seconds of the rate
CONCURRENCY_RETRY_S = 1.0  # a slot frees when one of the tenant's requests ends: no better estimate


class QuotaExceeded(TenancyError):
    """Over a quota (gRPC RESOURCE_EXHAUSTED, HTTP 429); `retry_after_s` says when to try again.
    (Defaults so that it unpickles from its message alone, as exceptions crossing Ray do.)"""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, reason: str = "quota", retry_after_s: float = 1.0):
        super().__init__(message, reason=reason)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_ms(self) -> int:
        """When the caller may try again, in whole milliseconds (at least 1)."""
        return max(1, round(self.retry_after_s * 1000))


class QuotaUnavailable(QuotaExceeded):
    """The shared quota ledger did not answer, and the application fails closed (gRPC UNAVAILABLE,
    HTTP 503, with a retry hint)."""

    status = "UNAVAILABLE"

    def __init__(self, message: str, *, reason: str = "quota_unavailable", retry_after_s: float = 1.0):
        super().__init__(message, reason=reason, retry_after_s=retry_after_s)


@dataclass
class TokenBucket:
    rate_per_s: float
    capacity: float
    level: float
    updated_at: float

    @classmethod
    def per_minute(cls, tokens_per_minute: int, now: float) -> "TokenBucket":
        rate = tokens_per_minute / 60.0
        capacity = rate * BURST_SECONDS
        return cls(rate, capacity, capacity, now)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated_at) * self.rate_per_s)
        self.updated_at = now

    def seconds_until_positive(self, now: float) -> float:
        self.refill(now)
        return 0.0 if self.level > 0 else (-self.level + 1e-9) / self.rate_per_s

    def charge(self, tokens: int, now: float) -> None:
        self.refill(now)
        self.level -= tokens


@dataclass
class _TenantUsage:
    active: int = 0
    bucket: TokenBucket | None = None
    tokens_per_minute: int | None = None


@dataclass
class Admission:
    """One admitted request: charge its output tokens as they come, release it at the end."""

    quotas: "TenantQuotas"
    tenant_id: str
    released: bool = False

    def charge(self, tokens: int) -> None:
        if tokens:
            self.quotas._charge(self.tenant_id, tokens)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.quotas._release(self.tenant_id)


@dataclass
class TenantQuotas:
    clock: Callable[[], float] = time.monotonic
    _usage: dict[str, _TenantUsage] = field(default_factory=dict)

    def admit(self, tenant: Tenant) -> Admission:
        """Admit a request of `tenant` or raise QuotaExceeded (naming the quota, with a retry hint)."""
        return self.admit_limits(tenant.id, tenant.limits)

    def admit_limits(self, tenant_id: str, limits: TenantLimits) -> Admission:
        now = self.clock()
        usage = self._usage_under(tenant_id, limits, now)
        if limits.max_concurrent_requests is not None and usage.active >= limits.max_concurrent_requests:
            raise QuotaExceeded(
                f"tenant {tenant_id!r} has {usage.active} requests in flight, its limit "
                f"(max_concurrent_requests={limits.max_concurrent_requests})",
                reason="concurrency", retry_after_s=CONCURRENCY_RETRY_S)
        if usage.bucket is not None:
            wait = usage.bucket.seconds_until_positive(now)
            if wait > 0:
                raise QuotaExceeded(
                    f"tenant {tenant_id!r} is over its output_tokens_per_minute={usage.tokens_per_minute}; retry in "
                    f"{math.ceil(wait)} s", reason="tokens_per_minute", retry_after_s=wait)
        usage.active += 1
        return Admission(self, tenant_id)

    def enter(self, tenant_id: str, limits: TenantLimits) -> Admission:
        """Count a request already admitted elsewhere (a ledger learning what is in flight), unchecked."""
        self._usage_under(tenant_id, limits, self.clock()).active += 1
        return Admission(self, tenant_id)

    def _usage_under(self, tenant_id: str, limits: TenantLimits, now: float) -> _TenantUsage:
        usage = self._usage.setdefault(tenant_id, _TenantUsage())
        rate = limits.output_tokens_per_minute
        if rate != usage.tokens_per_minute:  # new, or changed by a reload: start a fresh bucket
            usage.tokens_per_minute = rate
            usage.bucket = TokenBucket.per_minute(rate, now) if rate is not None else None
        return usage

    def _charge(self, tenant_id: str, tokens: int) -> None:
        bucket = self._usage[tenant_id].bucket
        if bucket is not None:
            bucket.charge(tokens, self.clock())

    def _release(self, tenant_id: str) -> None:
        self._usage[tenant_id].active -= 1

    def active(self) -> dict[str, int]:
        """Requests in flight per tenant."""
        return {tenant: usage.active for tenant, usage in self._usage.items() if usage.active}
