"""Kubernetes side of speccascade: render the Helm chart (`chart`), apply the KubeRay RayService it
produces (`rayservice`) and read its status (`status`), with the `kubernetes` Python client. No Ray imports."""

from .chart import HelmError, check_app_args, default_chart_dir, find_helm, render_chart, select_kind
from .rayservice import RAY_GROUP, RAY_VERSION, RAYSERVICE_PLURAL, ApplyResult, apply_rayservice, merge_patch
from .status import ServiceStatus, TierReplicas, format_status, read_status

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
