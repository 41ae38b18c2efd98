"""Operator policy files: validation that names the bad key, and the Serve config they become."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema
from speccascade.autoscale.policy import DeferralAwarePolicy
from speccascade.autoscale.settings import (
    DEFERRAL_POLICY_FUNCTION,
    apply_to_application,
    helm_values,
    load_settings,
    serve_autoscaling,
    settings_from_dict,
)

POLICY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "autoscaling"


@pytest.mark.parametrize("path", sorted(POLICY_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_policy_files_validate(path):
    settings = load_settings(path)
    assert settings.policy in ("deferral", "queue")


@pytest.mark.parametrize("document, named", [
    ({"expert": {"max_replicas": 0}}, "expert.max_replicas"),
    ({"expert": {"max_replica": 3}}, "expert.max_replica: unknown key"),
    ({"drafter": {"min_replicas": 5, "max_replicas": 2}}, "min_replicas=5 is above max_replicas=2"),
    ({"drafter": {"target_utilization": 1.5}}, "drafter.target_utilization"),
    ({"expert": {"max_step": 0}}, "expert.max_step"),
    ({"policy": "latency"}, "policy"),
    ({"look_back_period_s": 10, "deferral_window_s": 20}, "deferral_window_s=20.0 is longer than"),
    ({"deployments": {"drafter": "A", "expert": "A"}}, "deployment names must differ"),
    ({"polcy": "queue"}, "polcy: unknown key"),
])
def test_bad_settings_name_the_key(document, named):
    with pytest.raises(ValueError, match="autoscaling policy") as raised:
        settings_from_dict(document)
    assert named in str(raised.value)


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("expert:\n  upscale_delay_s: -1\n")
    with pytest.raises(ValueError, match=r"p\.yaml: expert\.upscale_delay_s"):
        load_settings(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_settings(tmp_path / "list.yaml")


def _app(settings):
    return apply_to_application(
        {"name": "speccascade", "import_path": "speccascade.app:build_app",
         "deployments": [{"name": "Expert", "num_replicas": 2, "max_ongoing_requests": 16}]},
        settings,
    )


def test_deferral_policy_becomes_an_application_policy_with_zero_ray_delays():
    settings = load_settings(POLICY_DIR / "deferral.yaml")
    app = _app(settings)
    ServeDeploySchema.model_validate({"applications": [app]})  # what `serve deploy` / KubeRay accept
    assert app["autoscaling_policy"]["policy_function"] == DEFERRAL_POLICY_FUNCTION
    # The controller builds the policy from exactly the operator's document.
    policy = DeferralAwarePolicy(**app["autoscaling_policy"]["policy_kwargs"])
    assert policy.settings == settings
    by_name = {d["name"]: d for d in app["deployments"]}
    expert = by_name["Expert"]
    assert "num_replicas" not in expert and expert["max_ongoing_requests"] == 16  # other options kept
    config = AutoscalingConfig(**expert["autoscaling_config"])
    assert (config.min_replicas, config.max_replicas) == (1, 8)
    assert config.upscale_delay_s == config.downscale_delay_s == 0  # the policy's delays are the only ones
    assert set(by_name) == {"Router", "Drafter", "Expert"}


def test_queue_policy_uses_rays_per_deployment_policy_and_delays():
    settings = load_settings(POLICY_DIR / "queue.yaml")
    app = _app(settings)
    ServeDeploySchema.model_validate({"applications": [app]})
    assert "autoscaling_policy" not in app
    expert = next(d for d in app["deployments"] if d["name"] == "Expert")
    config = AutoscalingConfig(**expert["autoscaling_config"])
    assert config.policy.is_default_policy_function()
    assert (config.target_ongoing_requests, config.upscale_delay_s, config.downscale_delay_s) == (1, 30, 300)
    assert serve_autoscaling(settings).autoscaling_policy is None


@pytest.mark.parametrize("name", ["deferral.yaml", "queue.yaml"])
def test_helm_values_carry_the_same_pieces(name):
    settings = load_settings(POLICY_DIR / name)
    values = helm_values(settings)["autoscaling"]
    pieces = serve_autoscaling(settings)
    assert values["deployments"] == pieces.deployments
    assert values["autoscalingPolicy"] == (pieces.autoscaling_policy or {})
    # What the chart renders from them is a valid Serve config.
    application = {"name": "speccascade", "import_path": "speccascade.app:build_app",
                   "deployments": values["deployments"]}
    if values["autoscalingPolicy"]:
        application["autoscaling_policy"] = values["autoscalingPolicy"]
    ServeDeploySchema.model_validate({"applications": [application]})


def test_settings_module_prints_helm_values_or_names_the_bad_key(tmp_path, capsys):
    from speccascade.autoscale.settings import main

    assert main([str(POLICY_DIR / "deferral.yaml")]) == 0
    assert "policy_function: speccascade.autoscale.policy:DeferralAwarePolicy" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("drafter:\n  max_step: 0\n")
    assert main([str(bad)]) == 2
    assert "drafter.max_step" in capsys.readouterr().err


def test_settings_module_merges_the_policy_into_a_serve_config(capsys):
    import yaml
    from speccascade.autoscale.settings import main

    serve_config = POLICY_DIR.parent / "gpu-cluster.yaml"
    assert main([str(POLICY_DIR / "deferral.yaml"), "--serve-config", str(serve_config)]) == 0
    merged = yaml.safe_load(capsys.readouterr().out)
    ServeDeploySchema.model_validate(merged)
    (app,) = merged["applications"]
    assert app["autoscaling_policy"]["policy_function"] == DEFERRAL_POLICY_FUNCTION
    assert app["args"] == yaml.safe_load(serve_config.read_text())["applications"][0]["args"]  # untouched
    assert {d["name"] for d in app["deployments"]} == {"Router", "Drafter", "Expert"}


def test_the_policy_and_its_settings_import_without_torch():
    """The Serve controller imports them; it has no torch (and should not pay for it)."""
    import subprocess
    import sys

    code = ("import sys, speccascade.autoscale.policy, speccascade.autoscale.settings; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
