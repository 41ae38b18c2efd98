"""Quotas with a fake clock: concurrency, and output tokens per minute as a token bucket."""

from __future__ import annotations

import pytest
from speccascade.tenancy import QuotaExceeded, Tenant, TenantQuotas
from speccascade.tenancy.quota import BURST_SECONDS


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(**limits) -> Tenant:
    return Tenant(id="t", key_sha256=["0" * 64], limits=limits)


def test_concurrency_limit_refuses_with_a_retry_hint_and_frees_on_release():
    quotas = TenantQuotas(clock=Clock())
    tenant = make(max_concurrent_requests=2)
    first, second = quotas.admit(tenant), quotas.admit(tenant)
    with pytest.raises(QuotaExceeded, match="max_concurrent_requests=2") as error:
        quotas.admit(tenant)
    assert error.value.reason == "concurrency" and error.value.retry_after_s > 0
    first.release()
    first.release()  # idempotent
    assert quotas.active() == {"t": 1}
    quotas.admit(tenant)
    second.release()


def test_tokens_per_minute_meters_output_and_says_when_to_retry():
    clock = Clock()
    quotas = TenantQuotas(clock=clock)
    tenant = make(output_tokens_per_minute=600)  # 10 tokens/s, burst 30
    request = quotas.admit(tenant)
    request.charge(30 + 40)  # into debt: 30 - 70 = -40
    request.release()
    with pytest.raises(QuotaExceeded, match="output_tokens_per_minute=600") as error:
        quotas.admit(tenant)
    assert error.value.reason == "tokens_per_minute"
    assert error.value.retry_after_s == pytest.approx(4.0, abs=0.01)  # 40 tokens at 10/s
    clock.now = 4.1
    quotas.admit(tenant).release()


def test_a_saturating_tenant_gets_its_rate_over_minutes():
    """Requests of 50 tokens as fast as admitted, for two minutes: N/min plus at most the burst."""
    clock = Clock()
    quotas = TenantQuotas(clock=clock)
    tenant = make(output_tokens_per_minute=6000)
    served = 0
    while clock.now < 120.0:
        try:
            request = quotas.admit(tenant)
        except QuotaExceeded as error:
            clock.now += error.retry_after_s
            continue
        request.charge(50)
        served += 50
        request.release()
        clock.now += 0.01
    assert 12000 <= served <= 12000 + 6000 * BURST_SECONDS / 60 + 50  # the rate, plus at most the burst and a request


def test_refusals_survive_pickling_as_they_cross_ray_processes():
    import pickle

    from speccascade.tenancy import PermissionDenied

    error = pickle.loads(pickle.dumps(QuotaExceeded("over", reason="concurrency", retry_after_s=2.5)))
    assert (str(error), error.reason, error.retry_after_s) == ("over", "concurrency", 2.5)
    denied = pickle.loads(pickle.dumps(PermissionDenied("off", reason="disabled")))
    assert (str(denied), denied.reason) == ("off", "disabled")
