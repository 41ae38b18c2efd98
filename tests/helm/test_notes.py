"""NOTES.txt (shown after `helm install`): `helm template` skips it, so a copy of the chart gets a
template that renders it with `tpl` into a YAML string."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from .conftest import CHART_DIR, GPU_EXAMPLE


@pytest.fixture
def render_notes(helm, tmp_path):
    chart = tmp_path / "speccascade"
    shutil.copytree(CHART_DIR, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-source.txt")
    (chart / "templates" / "notes.yaml").write_text(
        'notes: |\n{{ tpl (.Files.Get "notes-source.txt") . | indent 2 }}\n')

    def _render(*args: str) -> str:
        result = subprocess.run(
            [str(helm), "template", "llm", str(chart), "--namespace", "serving",
             "--show-only", "templates/notes.yaml", *args],
            capture_output=True, text=True, check=False,
        )
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)["notes"]

    return _render


def test_notes_show_a_port_forward_and_a_grpc_call_by_default(render_notes):
    notes = render_notes()
    assert "kubectl -n serving port-forward svc/llm-speccascade-grpc 9000:9000" in notes
    assert "grpcurl -plaintext localhost:9000 list" in notes
    assert "localhost:9000 speccascade.v1.SpecCascade/Generate" in notes
    assert "speccascade k8s status --namespace serving --name llm-speccascade" in notes


def test_notes_point_at_the_tls_ingress_when_enabled(render_notes):
    notes = render_notes("--values", str(GPU_EXAMPLE))
    assert "grpcurl speccascade.example.com:443 list" in notes
    assert "speccascade.example.com:443 speccascade.v1.SpecCascade/Generate" in notes
    assert "port-forward svc/llm-speccascade-grpc" not in notes
    assert "speccascade-tenants" in notes


def test_notes_use_plaintext_on_an_ingress_without_tls(render_notes):
    notes = render_notes("--set", "ingress.enabled=true", "--set", "ingress.host=llm.test")
    assert "grpcurl -plaintext llm.test:80 list" in notes


def test_notes_show_the_openai_api_and_helm_test(render_notes):
    notes = render_notes()
    assert "kubectl -n serving port-forward svc/llm-speccascade-serve-svc 8000:8000" in notes
    assert "curl http://localhost:8000/v1/chat/completions" in notes
    assert "http://llm-speccascade-serve-svc.serving.svc:8000/v1" in notes
    assert "helm test llm -n serving" in notes
    assert "dashboard" not in notes
    assert "helm test" not in render_notes("--set", "tests.enabled=false")
    assert "ConfigMap llm-speccascade-dashboard" in render_notes("--set", "grafana.dashboard.enabled=true")


def test_notes_say_why_there_is_no_helm_test_with_tenants_but_no_key(render_notes):
    notes = render_notes("--set", "tenantAuth.existingSecret=tenants")
    assert "`helm test` has no test pod" in notes and "tests.apiKeySecret.name" in notes
    assert "helm test llm" in render_notes("--set", "tenantAuth.existingSecret=tenants",
                                           "--set", "tests.apiKeySecret.name=key")


def test_notes_give_the_openai_url_of_the_http_ingress_when_enabled(render_notes):
    notes = render_notes("--set", "ingress.host=llm.test", "--set", "httpIngress.enabled=true",
                         "--set", "httpIngress.tls[0].secretName=llm-tls")
    assert "curl https://llm.test/v1/chat/completions" in notes and "port-forward svc/llm-speccascade-serve-svc" not in notes
    assert "curl http://api.test/v1/chat/completions" in render_notes("--set", "httpIngress.enabled=true",
                                                                      "--set", "httpIngress.host=api.test")
    assert "port-forward svc/llm-speccascade-serve-svc 8000:8000" in render_notes()
