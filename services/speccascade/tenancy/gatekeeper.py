"""The router's door: who is calling (API key -> tenant), what they may ask for, whether their
quota lets them in now, and in which order waiting requests get to decode (weighted fair share).

Without a tenants file the door is open: every request is the anonymous tenant "" with the
server's policy and no quotas (and the router says so at start). The errors are the tenancy
module's; each protocol front-end maps them to its status codes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ..config.app import CascadePolicy, TenancyConfig
from ..engine.request import GenerationRequest
from . import (
    DEFAULT_SHARE,
    Admission,
    AdmissionGate,
    Share,
    Tenant,
    TenantQuotas,
    TenantsFileWatcher,
)

log = logging.getLogger(__name__)

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
    def __init__(self, config: TenancyConfig, server_policy: CascadePolicy, *, clock=time.monotonic):
        self.config = config
        self.server_policy = server_policy
        self.clock = clock
        self.watcher = TenantsFileWatcher(config.tenants_file) if config.tenants_file else None
        self._checked_at = clock()
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

    def reload_if_due(self) -> str | None:
        """Look at the tenants file if `reload_period_s` passed; returns "ok" or "error" when it changed."""
        if self.watcher is None or self.clock() - self._checked_at < self.config.reload_period_s:
            return None
        self._checked_at = self.clock()
        result = self.watcher.poll()
        if not result.changed:
            return None
        return "error" if result.error else "ok"

    def identify(self, metadata: Iterable[tuple[str, str]]) -> Caller:
        """Raises Unauthenticated (no or unknown key) or PermissionDenied (a disabled tenant)."""
        if self.watcher is None:
            return Caller(None)
        return Caller(self.watcher.registry.authenticate(bearer_key(metadata)))

    def policy_for(self, caller: Caller) -> CascadePolicy:
        """The server's defaults, overridden by the tenant's (its default rule, alpha, block size; and no
        default max_new_tokens above its limit)."""
        tenant = caller.tenant
        if tenant is None:
            return self.server_policy
        policy, update = tenant.policy, {}
        if policy.default_rule is not None:
            update["rule"] = policy.default_rule
            update["alpha"] = policy.default_alpha if policy.default_alpha is not None else self.server_policy.alpha
        elif policy.default_alpha is not None:
            update["alpha"] = policy.default_alpha
        if policy.default_block_size is not None:
            update["block_size"] = policy.default_block_size
        limit = tenant.limits.max_new_tokens
        if limit is not None and limit < self.server_policy.max_new_tokens:
            update["max_new_tokens"] = limit
        return CascadePolicy.model_validate({**self.server_policy.model_dump(), **update}) if update else \
            self.server_policy

    def check(self, caller: Caller, request: GenerationRequest) -> None:
        if caller.tenant is not None:
            caller.tenant.check(request)

    def admit(self, caller: Caller) -> Admission | None:
        """A quota ticket (charge output tokens to it, release it at the end), or QuotaExceeded."""
        return self.quotas.admit(caller.tenant) if caller.tenant is not None else None

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
        return {"active": self.quotas.active(), "waiting": self.gate.waiting, "decoding": self.gate.active}
