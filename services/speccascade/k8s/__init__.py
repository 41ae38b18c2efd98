"""Kubernetes side of speccascade: render the Helm chart (`chart`) and read or apply the KubeRay
RayService it produces (`rayservice`), with the `kubernetes` Python client. No Ray imports."""

from .chart import HelmError, check_app_args, default_chart_dir, find_helm, render_chart, select_kind
from .rayservice import (
    RAYSERVICE_PLURAL,
    RAY_GROUP,
    RAY_VERSION,
    ApplyResult,
    ServiceStatus,
    TierReplicas,
    apply_rayservice,
    format_status,
    merge_patch,
    read_status,
)

__all__ = [
    "HelmError",
    "check_app_args",
    "default_chart_dir",
    "find_helm",
    "render_chart",
    "select_kind",
    "RAYSERVICE_PLURAL",
    "RAY_GROUP",
    "RAY_VERSION",
    "ApplyResult",
    "ServiceStatus",
    "TierReplicas",
    "apply_rayservice",
    "format_status",
    "merge_patch",
    "read_status",
]
