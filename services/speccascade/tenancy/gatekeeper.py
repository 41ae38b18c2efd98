"""The router's door: who is calling (API key -> tenant), what they may ask for, whether their
quota lets them in now, and in which order waiting requests get to decode (weighted fair share).

Without a tenants file the door is open: every request is the anonymous tenant "" with the
server's policy and no quotas (and the router says so at start). The errors are the tenancy
module's; each protocol front-end maps them to its status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from ..config.app import CascadePolicy, TenancyConfig
from ..engine.request import GenerationRequest
from ..options import ALPHA_RANGES, Rule
from . import (
    DEFAULT_SHARE,
    Admission,
    AdmissionGate,
    Share,
    Tenant,
    TenantPolicy,
    TenantQuotas,
    TenantsFileWatcher,
)

log = logging.getLogger(__name__)

class SharedQuotaBook(Protocol):
    """Quotas counted for the whole application (`serving.quota_ledger.SharedQuotas`)."""

    async def admit(self, tenant: Tenant) -> Admission: ...

    def active(self) -> dict[str, int]: ...


ANONYMOUS = ""  # the tenant id of requests to a service without tenants (a metric label value)


def bearer_key(metadata: Iterable[tuple[str, str]]) -> str | None:
    """The API key of `authorization: Bearer <key>` or `x-api-key: <key>` (metadata keys are lowercase)."""
    for name, value in metadata:
        if name == "authorization" and value.lower().startswith("bearer "):
            return value[len("bearer "):].strip()
        if name == "x-api-key":
            return value.strip()
    return None


@dataclass(frozen=True)
class Caller:
    """The tenant a request runs for (None: the service has no tenants)."""

    tenant: Tenant | None

    @property
    def id(self) -> str:
        return self.tenant.id if self.tenant else ANONYMOUS

    @property
    def share(self) -> Share:
        return Share(self.id, self.tenant.weight) if self.tenant else DEFAULT_SHARE


class Gatekeeper:
    def __init__(self, config: TenancyConfig, server_policy: CascadePolicy, *, clock=time.monotonic,
                 shared_quotas: SharedQuotaBook | None = None):
        """`shared_quotas`: the application's quota ledger as the serving layer reaches it (None: this
        router counts alone, `quotas`)."""
        self.config = config
        self.shared_quotas = shared_quotas
        self.server_policy = server_policy
        self.clock = clock
        self.watcher = TenantsFileWatcher(config.tenants_file) if config.tenants_file else None
        self.quotas = TenantQuotas(clock=clock)
        self.gate = AdmissionGate(config.max_decoding_requests, fair=config.fair_share)
        if self.watcher is None:
            log.warning("no tenants file (tenancy.tenants_file): the service answers anyone who reaches it, "
                        "without an API key")
        else:
            log.warning("%d tenants from %s", len(self.watcher.registry.tenants), config.tenants_file)

    @property
    def open(self) -> bool:
        return self.watcher is None

    def reload(self) -> str | None:
        """Look at the tenants file now; "ok" (applied) or "error" (refused) when it changed, else None."""
        if self.watcher is None:
            return None
        result = self.watcher.poll()
        if not result.changed:
            return None
        return "error" if result.error else "ok"

    async def reload_forever(self, on_change: Callable[[str], None] = lambda result: None) -> None:
        """Look at the tenants file every `reload_period_s`, whatever the traffic: a revoked key is
        refused on every route within one period, an idle replica included. `on_change` gets "ok"
        or "error" for each change seen. Runs until cancelled; returns at once without a file."""
        if self.watcher is None:
            return
        while True:
            await asyncio.sleep(self.config.reload_period_s)
            try:
                # Off the event loop: a large file takes a while to parse and validate, and the
                # swap of the registry is one assignment, which requests read whole.
                result = await asyncio.to_thread(self.reload)
            except Exception:  # a failed look must not stop the clock: the next period tries again
                log.exception("looking at the tenants file %s failed", self.config.tenants_file)
                continue
            if result is not None:
                on_change(result)

    def identify(self, metadata: Iterable[tuple[str, str]]) -> Caller:
        """Raises Unauthenticated (no or unknown key) or PermissionDenied (a disabled tenant)."""
        if self.watcher is None:
            return Caller(None)
        return Caller(self.watcher.registry.authenticate(bearer_key(metadata)))

    def policy_for(self, caller: Caller) -> CascadePolicy:
        """The server's defaults, overridden by the tenant's (its default rule, alpha, block size; and no
        default max_new_tokens above its limit). A tenant's default rule is its own or the first of
        its allowed rules (`TenantPolicy`); its default alpha its own, or one it may ask for."""
        tenant = caller.tenant
        if tenant is None:
            return self.server_policy
        policy, update = tenant.policy, {}
        if policy.default_rule is not None:
            update["rule"] = policy.default_rule
        if policy.default_alpha is not None:
            update["alpha"] = policy.default_alpha
        elif policy.default_rule is not None or policy.alpha is not None:
            update["alpha"] = self._default_alpha(policy.default_rule or self.server_policy.rule, policy)
        if policy.default_block_size is not None:
            update["block_size"] = policy.default_block_size
        limit = tenant.limits.max_new_tokens
        if limit is not None and limit < self.server_policy.max_new_tokens:
            update["max_new_tokens"] = limit
        return CascadePolicy.model_validate({**self.server_policy.model_dump(), **update}) if update else \
            self.server_policy

    def _default_alpha(self, rule: Rule, policy: TenantPolicy) -> float:
        """The server's alpha where the tenant may use it with `rule`; otherwise the lowest alpha the
        tenant may ask for with it (every rule's range starts at the end that defers most), so that a
        request naming no alpha is not refused for the server's choice."""
        alpha, valid = self.server_policy.alpha, ALPHA_RANGES[rule]
        if valid.contains(alpha) and policy.allows(rule, alpha):
            return alpha
        return valid.low if policy.alpha is None else max(valid.low, policy.alpha.min)

    def check(self, caller: Caller, request: GenerationRequest) -> None:
        if caller.tenant is not None:
            caller.tenant.check(request)

    async def admit(self, caller: Caller) -> Admission | None:
        """A quota ticket (charge output tokens to it, release it at the end), or QuotaExceeded
        (QuotaUnavailable when the shared ledger cannot be asked and the application fails closed)."""
        if caller.tenant is None:
            return None
        if self.shared_quotas is not None:
            return await self.shared_quotas.admit(caller.tenant)
        return self.quotas.admit(caller.tenant)

    @asynccontextmanager
    async def decoding_slot(self, caller: Caller, request: GenerationRequest):
        """Wait for one of the router's decoding slots, in fair order: a request costs its
        max_new_tokens in its tenant's share."""
        async with self.gate.slot(caller.share if self.config.fair_share else DEFAULT_SHARE,
                                  cost=float(request.max_new_tokens)):
            yield

    def load(self) -> dict:
        """Requests in flight per tenant (admitted, decoding or waiting for a slot), and how many of
        all wait for a decoding slot."""
        active = (self.shared_quotas or self.quotas).active()
        return {"active": active, "waiting": self.gate.waiting, "decoding": self.gate.active}
