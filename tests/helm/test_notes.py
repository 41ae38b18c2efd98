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
    assert "port-forward" not in notes
    assert "speccascade-tenants" in notes


def test_notes_use_plaintext_on_an_ingress_without_tls(render_notes):
    notes = render_notes("--set", "ingress.enabled=true", "--set", "ingress.host=llm.test")
    assert "grpcurl -plaintext llm.test:80 list" in notes
