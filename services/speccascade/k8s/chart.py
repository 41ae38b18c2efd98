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
    set_json_values: Iterable[str] = (),
    helm: Path | None = None,
    timeout_s: float = 60.0,
) -> list[dict]:
    """`helm template` the chart and return its objects (empty documents dropped).

    `set_values` is either `{"image.tag": "x"}` or `["image.tag=x"]` (helm's --set syntax; helm
    reads `1.5` there as a string, so numbers with a fraction go in `set_json_values`, helm's
    --set-json syntax: `["app.policy.alpha=0.3"]`).
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
    for pair in set_json_values:
        command += ["--set-json", pair]
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


APP_IMPORT_PATH = "speccascade.app:build_app"


def check_app_args(rayservice: dict) -> None:
    """Validate the args of every speccascade application in a rendered RayService's serveConfigV2
    with AppConfig, as the Serve controller will. The chart's values.schema.json already refused
    each wrong field; this adds the rules across fields (min_replicas <= max_replicas, static.slots
    >= max_batch_size, ...), which JSON Schema cannot state. Raises ValueError naming each problem
    by its values path (`app.<field>...`)."""
    from pydantic import ValidationError

    from ..config.app import AppConfig

    config = yaml.safe_load((rayservice.get("spec") or {}).get("serveConfigV2") or "{}") or {}
    for application in config.get("applications") or []:
        if application.get("import_path") != APP_IMPORT_PATH:
            continue
        try:
            AppConfig.model_validate(application.get("args") or {})
        except ValidationError as error:
            problems = []
            for item in error.errors():
                where = ".".join(["app", *(str(part) for part in item["loc"])])
                problems.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
            raise ValueError(f"application {application.get('name')!r}: " + "; ".join(problems)) from None
