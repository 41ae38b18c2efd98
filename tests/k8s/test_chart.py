"""speccascade.k8s.chart: finding helm and reporting render problems before and from helm."""

from __future__ import annotations

import os
import stat

import pytest
from speccascade.k8s import HelmError, find_helm, render_chart, select_kind

from ..helm.conftest import skip_or_fail_in_ci


def test_find_helm_prefers_the_environment_variable(tmp_path, monkeypatch):
    fake = tmp_path / "helm"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("SPECCASCADE_HELM", str(fake))
    assert find_helm() == fake


def test_render_rejects_a_directory_without_a_chart(tmp_path):
    with pytest.raises(HelmError, match="is not a Helm chart"):
        render_chart(chart_dir=tmp_path, helm=tmp_path / "unused")


def test_render_rejects_a_missing_values_file(tmp_path):
    with pytest.raises(HelmError, match="values file .*missing.yaml does not exist"):
        render_chart(values_files=[tmp_path / "missing.yaml"], helm=tmp_path / "unused")


def test_render_passes_release_and_namespace_through():
    try:
        helm = find_helm()
    except HelmError as error:
        skip_or_fail_in_ci(f"helm is not installed ({error})")
    objects = render_chart(release="prod", namespace="ml", helm=helm, set_values={"fullnameOverride": "llm"})
    (service,) = select_kind(objects, "RayService", "ray.io/v1")
    assert service["metadata"]["name"] == "llm"
    assert service["metadata"]["labels"]["app.kubernetes.io/instance"] == "prod"
    assert os.path.basename(str(helm)) == "helm"
