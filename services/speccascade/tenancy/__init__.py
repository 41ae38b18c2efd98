"""Multi-tenant serving: tenants and their keys (`tenants.py`), quotas (`quota.py`), weighted fair
queueing (`fairness.py`) and hot reload of the tenants file (`reload.py`). No Ray or gRPC here: the
router maps these errors to status codes."""

from .fairness import DEFAULT_SHARE, AdmissionGate, FairQueue, Share
from .quota import Admission, QuotaExceeded, TenantQuotas
from .reload import TenantsFileWatcher
from .tenants import (
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
    "Admission",
    "AdmissionGate",
    "FairQueue",
    "PermissionDenied",
    "QuotaExceeded",
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
