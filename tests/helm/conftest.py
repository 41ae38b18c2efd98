"""Fixtures for the chart tests: the helm binary, rendering, and the KubeRay CRD schemas.

Tests skip (with the reason) when helm is not installed locally; CI installs it with
scripts/install_helm.sh, and under CI (CI=true) a missing helm or CRD copy fails instead. The CRD schemas are the copy in the shared directory beside the
repository (`../shared/kuberay-crds/`), or $SPECCASCADE_KUBERAY_CRDS.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from speccascade.k8s import HelmError, default_chart_dir, find_helm, render_chart

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = default_chart_dir()
GPU_EXAMPLE = CHART_DIR / "examples" / "values-gpu-production.yaml"
# kubernetes-validate ships schemas per Kubernetes minor version; the chart targets >= 1.26.
KUBERNETES_VERSION = "1.33.0"


def _crd_dir() -> Path | None:
    candidates = [REPO_ROOT.parent / "shared" / "kuberay-crds"]
    if os.environ.get("SPECCASCADE_KUBERAY_CRDS"):
        candidates.insert(0, Path(os.environ["SPECCASCADE_KUBERAY_CRDS"]))
    for candidate in candidates:
        if (candidate / "ray.io_rayservices.yaml").is_file():
            return candidate
    return None


def skip_or_fail_in_ci(reason: str):
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"{reason}; CI must provide it")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return find_helm()
    except HelmError as error:
        skip_or_fail_in_ci(f"helm is not installed ({error})")


@pytest.fixture(scope="session")
def render(helm):
    """render(values_files=(), set_values=(), set_json=()) -> rendered objects; raises HelmError on failure."""

    def _render(values_files=(), set_values=(), set_json=(), release="speccascade", namespace="serving"):
        return render_chart(release=release, namespace=namespace, values_files=values_files,
                            set_values=set_values, set_json_values=set_json, helm=helm)

    return _render


@pytest.fixture(scope="session")
def rayservice_schema() -> dict:
    crd_dir = _crd_dir()
    if crd_dir is None:
        skip_or_fail_in_ci(f"KubeRay CRDs not found beside the repository ({REPO_ROOT.parent / 'shared' / 'kuberay-crds'})")
    crd = yaml.safe_load((crd_dir / "ray.io_rayservices.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]
