"""Typed configuration, validated once at the edge (the Serve application's `args`, the Helm
chart's values, the command line): the strict base every model shares (`base.py`) and the
application's configuration (`app.py`). Torch-free, so reading a configuration loads no model
library."""

from .app import (
    AppConfig,
    CascadePolicy,
    Placement,
    Replicas,
    RouterConfig,
    StaticBackendConfig,
    TenancyConfig,
    TierConfig,
)
from .base import ReplicaBounds, StrictModel

__all__ = [
    "AppConfig",
    "CascadePolicy",
    "Placement",
    "ReplicaBounds",
    "Replicas",
    "RouterConfig",
    "StaticBackendConfig",
    "StrictModel",
    "TenancyConfig",
    "TierConfig",
]
