"""The quota ledger shared by router replicas, with a fake clock: admissions from any router count
against one set of limits, output tokens arrive with the leases, a dead router's tickets expire,
and a restarted ledger learns what is in flight from the leases."""

from __future__ import annotations

import pytest
from speccascade.tenancy import QuotaExceeded, TenantLimits
from speccascade.tenancy.ledger import LEASE_S, Lease, QuotaLedger
from speccascade.tenancy.quota import BURST_SECONDS

from .test_quota import Clock

TWO_AT_ONCE = TenantLimits(max_concurrent_requests=2)


def test_admissions_of_every_router_count_against_one_concurrency_limit():
    ledger = QuotaLedger(clock=Clock())
    assert ledger.admit("router-a/1", "t", TWO_AT_ONCE).admitted
    assert ledger.admit("router-b/1", "t", TWO_AT_ONCE).admitted
    refused = ledger.admit("router-b/2", "t", TWO_AT_ONCE)
    assert not refused.admitted and refused.reason == "concurrency" and "max_concurrent_requests=2" in refused.message
    with pytest.raises(QuotaExceeded, match="max_concurrent_requests=2"):
        refused.raise_if_refused()
    assert ledger.admit("other/1", "u", TWO_AT_ONCE).admitted  # another tenant has its own count
    ledger.release("router-a/1")
    ledger.release("router-a/1")  # a second release of a ticket changes nothing
    assert ledger.active() == {"t": 1, "u": 1}
    assert ledger.admit("router-b/3", "t", TWO_AT_ONCE).admitted


def test_output_tokens_reported_by_the_leases_drain_one_bucket():
    clock = Clock()
    ledger = QuotaLedger(clock=clock)
    rate = TenantLimits(output_tokens_per_minute=600)  # 10 tokens/s, a burst of 30
    assert ledger.admit("a/1", "t", rate).admitted and ledger.admit("b/1", "t", rate).admitted
    ledger.sync([Lease("a/1", "t", rate, tokens=25)])
    ledger.release("b/1", tokens=15)  # what router b had not reported yet
    refused = ledger.admit("a/2", "t", rate)
    assert not refused.admitted and refused.reason == "tokens_per_minute"
    assert refused.retry_after_s == pytest.approx((25 + 15 - 10 * BURST_SECONDS) / 10, abs=1e-6)
    clock.now += refused.retry_after_s + 0.01
    assert ledger.admit("a/2", "t", rate).admitted


def test_a_dead_routers_tickets_expire_and_a_live_routers_leases_keep_theirs():
    clock = Clock()
    ledger = QuotaLedger(clock=clock)
    assert ledger.admit("dead/1", "t", TWO_AT_ONCE).admitted and ledger.admit("live/1", "t", TWO_AT_ONCE).admitted
    for _ in range(3):
        clock.now += LEASE_S / 2
        ledger.sync([Lease("live/1", "t", TWO_AT_ONCE)])
    assert ledger.active() == {"t": 1}  # the dead router's request no longer counts; the live one does
    clock.now += LEASE_S
    assert ledger.active() == {}


def test_a_restarted_ledger_learns_the_requests_in_flight_from_the_leases():
    ledger = QuotaLedger(clock=Clock())  # a fresh ledger: its predecessor admitted a/1 and b/1
    ledger.sync([Lease("a/1", "t", TWO_AT_ONCE, tokens=3)])
    ledger.sync([Lease("b/1", "t", TWO_AT_ONCE)])
    assert ledger.active() == {"t": 2}
    assert not ledger.admit("c/1", "t", TWO_AT_ONCE).admitted
    ledger.release("a/1")
    assert ledger.admit("c/1", "t", TWO_AT_ONCE).admitted
