"""Render the speccascade Helm chart with the `helm` binary (`helm template`: no cluster needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

# services/speccascade/k8s/chart.py -> repository root
_REPO_ROOT = Path(__file__).resolve().parents[3]
HELM_ENV_VAR = "SPECCASCADE_HELM"


class HelmError(RuntimeError):
    """`helm` is missing or refused to render; the message carries helm's own error."""


def default_chart_dir() -> Path:
    """The chart in this source tree (`helm/speccascade/`)."""
    return _REPO_ROOT / "helm" / "speccascade"


def find_helm() -> Path:
    """The helm binary: $SPECCASCADE_HELM, then `.tools/bin/helm` (scripts/install_helm.sh), then PATH."""
    candidates: list[Path] = []
    if os.environ.get(HELM_ENV_VAR):
        candidates.append(Path(os.environ[HELM_ENV_VAR]))
    candidates.append(_REPO_ROOT / ".tools" / "bin" / "helm")
    on_path = shutil.which("helm")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise HelmError(
        f"no helm binary: set ${HELM_ENV_VAR}, run scripts/install_helm.sh, or put helm on PATH "
        f"(looked at {', '.join(str(c) for c in candidates)})"
    )


def render_chart(
    *,
    release: str = "speccascade",
    namespace: str = "default",
    chart_dir: Path | None = None,
    values_files: Sequence[Path | str] = (),
    set_values: Mapping[str, str] | Iterable[str] = (),
    helm: Path | None = None,
    timeout_s: float = 60.0,
) -> list[dict]:
    """`helm template` the chart and return its objects (empty documents dropped).

    `set_values` is either `{"image.tag": "x"}` or `["image.tag=x"]` (helm's --set syntax).
    Raises HelmError with helm's message when rendering fails (e.g. a `fail` in a template).
    """
    chart = Path(chart_dir) if chart_dir is not None else default_chart_dir()
    if not (chart / "Chart.yaml").is_file():
        raise HelmError(f"{chart} is not a Helm chart (no Chart.yaml); outside a source checkout pass the chart directory")
    command = [str(helm or find_helm()), "template", release, str(chart), "--namespace", namespace]
    for values_file in values_files:
        if not Path(values_file).is_file():
            raise HelmError(f"values file {values_file} does not exist")
        command += ["--values", str(values_file)]
    pairs = [f"{k}={v}" for k, v in set_values.items()] if isinstance(set_values, Mapping) else list(set_values)
    for pair in pairs:
        command += ["--set", pair]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0:
        raise HelmError(f"helm template failed: {result.stderr.strip() or result.stdout.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def select_kind(objects: Iterable[dict], kind: str, api_version: str | None = None) -> list[dict]:
    """The rendered objects of one kind (and apiVersion, if given)."""
    return [
        obj for obj in objects
        if obj.get("kind") == kind and (api_version is None or obj.get("apiVersion") == api_version)
    ]
