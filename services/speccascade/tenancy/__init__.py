"""Multi-tenant serving: tenants and their keys (`tenants.py`), quotas (`quota.py`), weighted fair
queueing (`fairness.py`), hot reload of the tenants file (`reload.py`), and the gatekeeper that
applies them to a request (`gatekeeper.py`). No Ray or gRPC here: the protocol front-ends map
these errors to their status codes."""

from .fairness import DEFAULT_SHARE, AdmissionGate, FairQueue, Share
from .quota import RETRY_AFTER_HEADER, Admission, QuotaExceeded, QuotaUnavailable, TenantQuotas
from .reload import TenantsFileWatcher
from .tenants import (
    MissingKey,
    PermissionDenied,
    TenancyError,
    Tenant,
    TenantLimits,
    TenantPolicy,
    TenantRegistry,
    TenantsFile,
    Unauthenticated,
    key_digest,
    new_api_key,
)

__all__ = [
    "DEFAULT_SHARE",
    "RETRY_AFTER_HEADER",
    "Admission",
    "AdmissionGate",
    "FairQueue",
    "MissingKey",
    "PermissionDenied",
    "QuotaExceeded",
    "QuotaUnavailable",
    "Share",
    "TenancyError",
    "Tenant",
    "TenantLimits",
    "TenantPolicy",
    "TenantQuotas",
    "TenantRegistry",
    "TenantsFile",
    "TenantsFileWatcher",
    "Unauthenticated",
    "key_digest",
    "new_api_key",
]
