"""Quotas shared by all router replicas of an application: one ledger holds every tenant's
requests in flight and output-token bucket (`TenantQuotas`), so a tenant's limits hold for the
application as a whole, whatever the number of router replicas.

Each admitted request is a ticket with a lease. Its router renews the leases of its requests in
flight, and sends the output tokens they produced, every `SYNC_PERIOD_S` (`sync`), and gives the
ticket back when the request ends (`release`). A ticket whose lease runs out (its router died
without giving it back) is released by the ledger, so a dead router's requests stop counting
against their tenants' concurrency after at most `LEASE_S`. A lease renewed for a ticket the ledger
does not know (the ledger itself was restarted) enters it again without a check: a restarted
ledger learns the requests in flight within one sync period.

Pure bookkeeping, no Ray: the serving layer runs it as a named actor (`serving.quota_ledger`),
where its calls are answered one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .quota import Admission, QuotaExceeded, TenantQuotas
from .tenants import TenantLimits

SYNC_PERIOD_S = 1.0  # how often a router renews its tickets and reports their output tokens
LEASE_S = 10.0  # a ticket not renewed for this long is released (its router is gone)


@dataclass(frozen=True)
class Verdict:
    """The ledger's answer to an admission (a value, not an exception: it crosses processes)."""

    admitted: bool
    message: str = ""
    reason: str = ""
    retry_after_s: float = 0.0

    def raise_if_refused(self) -> None:
        if not self.admitted:
            raise QuotaExceeded(self.message, reason=self.reason, retry_after_s=self.retry_after_s)


@dataclass(frozen=True)
class Lease:
    """A request in flight as its router reports it."""

    ticket: str
    tenant_id: str
    limits: TenantLimits
    tokens: int = 0  # output tokens produced since the router's last report


@dataclass
class _Held:
    admission: Admission
    expires_at: float


class QuotaLedger:
    def __init__(self, *, lease_s: float = LEASE_S, clock: Callable[[], float] = time.monotonic):
        self.lease_s = lease_s
        self.clock = clock
        self.quotas = TenantQuotas(clock=clock)
        self._held: dict[str, _Held] = {}

    def admit(self, ticket: str, tenant_id: str, limits: TenantLimits) -> Verdict:
        self._expire()
        try:
            admission = self.quotas.admit_limits(tenant_id, limits)
        except QuotaExceeded as error:
            return Verdict(False, str(error), error.reason, error.retry_after_s)
        self._held[ticket] = _Held(admission, self.clock() + self.lease_s)
        return Verdict(True)

    def sync(self, leases: Iterable[Lease]) -> None:
        """A router's requests in flight: renew their leases and charge their new output tokens."""
        for lease in leases:
            held = self._held.get(lease.ticket)
            if held is None:  # the ledger restarted since this ticket was admitted
                held = self._held[lease.ticket] = _Held(self.quotas.enter(lease.tenant_id, lease.limits), 0.0)
            held.expires_at = self.clock() + self.lease_s
            held.admission.charge(lease.tokens)
        self._expire()

    def release(self, ticket: str, tokens: int = 0) -> None:
        """A request ended; `tokens`: its output not yet reported."""
        held = self._held.pop(ticket, None)
        if held is not None:
            held.admission.charge(tokens)
            held.admission.release()

    def _expire(self) -> None:
        now = self.clock()
        for ticket in [ticket for ticket, held in self._held.items() if held.expires_at <= now]:
            self._held.pop(ticket).admission.release()

    def active(self) -> dict[str, int]:
        """Requests in flight per tenant, over all routers."""
        self._expire()
        return self.quotas.active()
