"""A router replica's client of the shared quota ledger when the ledger does not answer: failing
open admits by the replica's own count, failing closed refuses with UNAVAILABLE and a retry hint;
both are counted. (The ledger itself: tests/tenancy/test_ledger.py; shared by two router replicas:
tests/tenancy/test_served.py.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from speccascade.config.app import TenancyConfig
from speccascade.serving.quota_ledger import SharedQuotas
from speccascade.tenancy import QuotaExceeded, Tenant
from speccascade.tenancy.quota import QuotaUnavailable


class Counted:
    def __init__(self):
        self.tags: list[dict] = []

    def inc(self, tags=None):
        self.tags.append(tags)


def quotas_without_ledger(mode: str) -> tuple[SharedQuotas, Counted]:
    unreachable = Counted()
    quotas = SharedQuotas("app", TenancyConfig(quota_ledger_unreachable=mode, quota_ledger_timeout_s=0.1),
                          SimpleNamespace(quota_ledger_unreachable=unreachable))

    # A ledger that never answers (its calls are awaitables that do not finish in time).
    quotas._handle = lambda: SimpleNamespace(admit=SimpleNamespace(remote=lambda *args: asyncio.sleep(3600)))
    return quotas, unreachable


SINGLE = Tenant(id="single", key_sha256=["0" * 64], limits={"max_concurrent_requests": 1})


def test_failing_open_admits_by_the_replicas_own_count():
    quotas, unreachable = quotas_without_ledger("open")

    async def scenario():
        first = await quotas.admit(SINGLE)
        with pytest.raises(QuotaExceeded, match="max_concurrent_requests=1"):  # the local limit still holds
            await quotas.admit(SINGLE)
        assert quotas.active() == {"single": 1}
        first.release()
        assert quotas.active() == {}

    asyncio.run(scenario())
    assert unreachable.tags == [{"mode": "open"}] * 2


def test_failing_closed_refuses_with_unavailable_and_a_retry_hint():
    quotas, unreachable = quotas_without_ledger("closed")
    with pytest.raises(QuotaUnavailable) as error:
        asyncio.run(quotas.admit(SINGLE))
    assert error.value.status == "UNAVAILABLE" and error.value.retry_after_ms >= 1
    assert "quota ledger did not answer within 0.1s" in str(error.value) and "quota_ledger_unreachable=closed" in \
        str(error.value)
    assert unreachable.tags == [{"mode": "closed"}] and quotas.active() == {}
