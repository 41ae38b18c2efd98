"""Tenant quotas for the whole application: the shared ledger (`tenancy.ledger.QuotaLedger`) as
a named Ray actor, and a router replica's client of it.

The ledger is a named actor in namespace `speccascade` (`quota-ledger/<application>`), made by
the first router replica to start (`get_if_exists`; the others find it); Ray runs its calls one at
a time. A router replica is ready only once the ledger answers it (`connect`, within
`LEDGER_START_S`), so the first requests after a deploy do not wait on a ledger still being made.
A replica keeps its handle while the ledger lives: a slow answer is not a dead ledger. The ledger
belongs to the replica that made it and goes with it; the next admission anywhere makes it again,
and the other replicas' next sync tells it their requests in flight (their output-token buckets
restart full: a tenant may get one extra burst, three seconds of its rate).

When the ledger does not answer within `tenancy.quota_ledger_timeout_s`, the application's choice
(`tenancy.quota_ledger_unreachable`) decides: `open` admits by this replica's own bookkeeping (the
per-replica limits of a lone router) and logs it; `closed` refuses with UNAVAILABLE and a retry
hint. Either way `speccascade_quota_ledger_unreachable_total` counts it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from ..config.app import TenancyConfig
from ..status_board import NAMESPACE
from ..tenancy import Tenant, TenantQuotas
from ..tenancy.ledger import SYNC_PERIOD_S, Lease, QuotaLedger
from ..tenancy.quota import QuotaUnavailable
from .metrics import RouterMetrics

log = logging.getLogger(__name__)

LEDGER_START_S = 60.0  # how long a starting router replica waits for the ledger to be made and answer


def ledger_name(app_name: str) -> str:
    return f"quota-ledger/{app_name}"


@dataclass(eq=False)
class SharedAdmission:
    """One request admitted by the ledger: its output tokens are reported at the next sync, the
    ticket given back when it ends."""

    quotas: "SharedQuotas"
    ticket: str
    tenant: Tenant
    unreported: int = 0
    released: bool = False

    def charge(self, tokens: int) -> None:
        self.unreported += tokens

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.quotas._give_back(self)


class SharedQuotas:
    """A router replica's admissions through the application's ledger."""

    def __init__(self, app_name: str, config: TenancyConfig, metrics: RouterMetrics):
        self.app_name = app_name
        self.config = config
        self.metrics = metrics
        self.local = TenantQuotas()  # used only while the ledger does not answer, when failing open
        self._live: dict[str, SharedAdmission] = {}
        self._ledger = None
        self._sync_task: asyncio.Task | None = None

    def _handle(self):
        import ray

        if self._ledger is None:
            self._ledger = ray.remote(QuotaLedger).options(
                name=ledger_name(self.app_name), namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
            ).remote()
        return self._ledger

    async def connect(self, timeout_s: float = LEDGER_START_S) -> bool:
        """Make or find the ledger and wait until it answers; whether it did within `timeout_s`
        (if not, admissions meet `tenancy.quota_ledger_unreachable` until it does)."""
        try:
            await self._ask("active", timeout_s=timeout_s)
            return True
        except Exception as error:
            log.warning("the application's quota ledger did not answer within %gs of this router replica's start "
                        "(%r); admissions follow tenancy.quota_ledger_unreachable=%s until it does",
                        timeout_s, error, self.config.quota_ledger_unreachable)
            return False

    async def _ask(self, method: str, *args, timeout_s: float | None = None):
        from ray.exceptions import RayActorError

        for attempt in (1, 2):
            try:
                async with asyncio.timeout(timeout_s or self.config.quota_ledger_timeout_s):
                    return await getattr(self._handle(), method).remote(*args)
            except RayActorError:  # its owner (another router replica) is gone: make it again, once
                self._ledger = None
                if attempt == 2:
                    raise

    async def admit(self, tenant: Tenant):
        """A ticket of the ledger (or of this replica's own bookkeeping while the ledger does not
        answer and the application fails open); QuotaExceeded or QuotaUnavailable otherwise."""
        ticket = uuid.uuid4().hex
        try:
            verdict = await self._ask("admit", ticket, tenant.id, tenant.limits)
        except Exception as error:  # timeout, or the actor could not be made or reached
            # Only the wait ended: a ledger slow to answer (being made again, say) still admits the
            # ticket when the call reaches it, and would count a request that never ran until its
            # lease ran out, refusing the tenant's next one. Given back at once: Ray delivers this
            # replica's calls in order, so the release comes after the admission.
            if self._ledger is not None:
                self._release_ticket(ticket, 0)
            mode = self.config.quota_ledger_unreachable
            self.metrics.quota_ledger_unreachable.inc(tags={"mode": mode})
            reason = f"the application's quota ledger did not answer within {self.config.quota_ledger_timeout_s:g}s " \
                     f"({type(error).__name__})"
            if mode == "closed":
                raise QuotaUnavailable(f"tenant {tenant.id!r}: quotas cannot be checked now: {reason}; retry "
                                       f"(tenancy.quota_ledger_unreachable=closed)") from None
            log.warning("%s; admitting tenant %r by this router replica's own count "
                        "(tenancy.quota_ledger_unreachable=open)", reason, tenant.id)
            return self.local.admit(tenant)
        verdict.raise_if_refused()
        admission = SharedAdmission(self, ticket, tenant)
        self._live[ticket] = admission
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())
        return admission

    def _give_back(self, admission: SharedAdmission) -> None:
        self._live.pop(admission.ticket, None)
        # Ray delivers one caller's calls in order: after any sync that still named the ticket.
        self._release_ticket(admission.ticket, admission.unreported)

    def _release_ticket(self, ticket: str, tokens: int) -> None:
        try:
            self._handle().release.remote(ticket, tokens)
        except Exception:
            log.warning("could not give ticket %s back to the quota ledger; its lease runs out instead",
                        ticket, exc_info=True)

    async def _sync_forever(self) -> None:
        """Renew this replica's tickets and report their output tokens, while any are live."""
        while self._live:
            await asyncio.sleep(SYNC_PERIOD_S)
            live = list(self._live.values())
            taken = [admission.unreported for admission in live]
            for admission in live:
                admission.unreported = 0
            leases = [Lease(a.ticket, a.tenant.id, a.tenant.limits, tokens) for a, tokens in zip(live, taken)]
            try:
                await self._ask("sync", leases)
            except Exception as error:
                for admission, tokens in zip(live, taken):  # report them with the next sync
                    admission.unreported += tokens
                log.warning("quota ledger sync failed (%r); retrying in %gs", error, SYNC_PERIOD_S)

    def active(self) -> dict[str, int]:
        """This replica's requests in flight per tenant."""
        counts: dict[str, int] = dict(self.local.active())
        for admission in self._live.values():
            counts[admission.tenant.id] = counts.get(admission.tenant.id, 0) + 1
        return counts

    def close(self) -> None:
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_task.cancel()
