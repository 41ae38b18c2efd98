"""The chart's autoscaling values: the application policy and each deployment's autoscaling_config,
rendered into serveConfigV2 the way Ray Serve and KubeRay accept them, and the example values kept
equal to what the autoscaling settings module generates."""

from __future__ import annotations

import subprocess

import jsonschema
import pytest
import yaml
from speccascade.k8s import HelmError

from .conftest import CHART_DIR, GPU_EXAMPLE, REPO_ROOT
from .test_chart import app_of, rayservice_of, serve_config_of, serve_deployments, strict, worker_groups

AUTOSCALING_EXAMPLE = CHART_DIR / "examples" / "values-autoscaling.yaml"
DEFERRAL_POLICY = REPO_ROOT / "deploy" / "autoscaling" / "deferral.yaml"
BASES = {"default": (), "gpu-production": (GPU_EXAMPLE,)}


def example_values() -> dict:
    return yaml.safe_load(AUTOSCALING_EXAMPLE.read_text())


@pytest.fixture(scope="module", params=sorted(BASES))
def autoscaled(request, render):
    """The RayService rendered from a base values file with the autoscaling example layered on."""
    return rayservice_of(render(values_files=(*BASES[request.param], AUTOSCALING_EXAMPLE)))


def test_example_is_what_the_settings_module_generates():
    from speccascade.autoscale.settings import helm_values, load_settings

    settings = load_settings(DEFERRAL_POLICY)
    example = example_values()
    assert example["autoscaling"] == helm_values(settings)["autoscaling"]
    # Besides the generated block, the example only sizes the worker groups for the policy's bounds.
    assert set(example) == {"autoscaling", "tiers"}
    for tier in ("drafter", "expert"):
        assert example["tiers"][tier] == {"workerGroup": {"maxReplicas": settings.tier(tier).max_replicas}}


def test_autoscaled_serve_config_is_valid_for_ray_serve_app_config_and_kuberay(autoscaled, rayservice_schema):
    from ray.serve.schema import ServeDeploySchema
    from speccascade.config.app import AppConfig

    jsonschema.Draft7Validator(strict(rayservice_schema)).validate(autoscaled)
    config = ServeDeploySchema.model_validate(serve_config_of(autoscaled))
    (app,) = config.applications
    AppConfig.model_validate(app.args)
    assert app.autoscaling_policy is not None
    assert {d.name for d in app.deployments} == {"Router", "Drafter", "Expert"}


def test_each_deployment_carries_the_values_autoscaling_config_and_no_replica_count(autoscaled):
    app = app_of(autoscaled)
    expected = {d["name"]: d["autoscaling_config"] for d in example_values()["autoscaling"]["deployments"]}
    rendered = {d["name"]: d for d in app["deployments"]}
    assert {name: d["autoscaling_config"] for name, d in rendered.items()} == expected
    assert all(set(d) == {"name", "autoscaling_config"} for d in rendered.values())
    # The names are the deployments the application builder really creates.
    assert set(rendered) == set(serve_deployments(app["args"]))


def test_application_policy_equals_the_values(autoscaled):
    assert app_of(autoscaled)["autoscaling_policy"] == example_values()["autoscaling"]["autoscalingPolicy"]


def test_ray_applies_each_autoscaling_config_over_the_built_deployments(autoscaled):
    """Ray's own override step (what the Serve controller runs after building the app): every
    deployment autoscales on the values' bounds, the router included although its args give it a
    fixed replica count, and the placement from the tier values is kept."""
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve._private.deploy_utils import deploy_args_to_deployment_info
    from ray.serve.schema import ServeApplicationSchema
    from speccascade.app import build_app

    app = app_of(autoscaled)
    built = build_serve_app(build_app(app["args"]), name=app["name"], default_runtime_env={})
    infos = {
        d.name: deploy_args_to_deployment_info(
            d.name, d._deployment_config.to_proto_bytes(), d._replica_config.to_proto_bytes(),
            deployer_job_id="helm-test", app_name=app["name"])
        for d in built.deployments
    }
    overridden = override_deployment_info(infos, ServeApplicationSchema.model_validate(app))

    def applied(config, wanted: dict) -> dict | None:
        return None if config is None else {key: getattr(config, key) for key in wanted}

    for entry in app["deployments"]:
        wanted = entry["autoscaling_config"]
        # What the args alone give (a fixed count under the default values' router) is not the values'...
        assert applied(infos[entry["name"]].deployment_config.autoscaling_config, wanted) != wanted
        info = overridden[entry["name"]]
        # ...until Ray merges the config's deployment entry in.
        assert applied(info.deployment_config.autoscaling_config, wanted) == wanted
        assert info.replica_config.ray_actor_options == infos[entry["name"]].replica_config.ray_actor_options


def test_without_deployment_values_no_deployments_are_rendered(render):
    assert "deployments" not in app_of(rayservice_of(render()))


def test_example_grows_the_worker_groups_to_the_policy_bounds(autoscaled):
    groups = worker_groups(autoscaled)
    assert (groups["drafter"]["maxReplicas"], groups["expert"]["maxReplicas"]) == (16, 8)


def entry(name, **config):
    return {"name": name, "autoscaling_config": config or {"min_replicas": 1, "max_replicas": 2}}


@pytest.mark.parametrize(
    ("deployments", "message"),
    [
        ([entry("Verifier")],
         r'autoscaling.deployments\[0\].name="Verifier" is not a deployment of the application; '
         r"expected one of Drafter, Expert, Router"),
        ([entry("Router"), entry("router")], r'autoscaling.deployments\[1\].name="router" is not a deployment'),
        ([{"autoscaling_config": {"max_replicas": 2}}], r'autoscaling.deployments\[0\].name="" is not a deployment'),
        ([entry("Expert"), entry("Expert")], r'autoscaling.deployments\[1\].name="Expert" is listed twice'),
        ([{**entry("Drafter"), "num_replicas": 2}],
         r"autoscaling.deployments\[0\] \(Drafter\) has keys num_replicas; only name and autoscaling_config"),
        ([{"name": "Expert", "autoscaling_config": {}}],
         r"autoscaling.deployments\[0\] \(Expert\).autoscaling_config must be a non-empty map"),
        ([entry("Drafter", min_replicas=1, max_replicas=3)],
         r"autoscaling.deployments\[0\] \(Drafter\).autoscaling_config.max_replicas=3 cannot fit: "
         r"tiers.drafter.workerGroup.maxReplicas=2 pods x replicasPerPod=1"),
    ],
    ids=["unknown-name", "wrong-case", "no-name", "duplicate", "num-replicas", "empty-config", "cannot-fit"],
)
def test_bad_deployment_entries_fail_helm_template_with_a_clear_message(render, tmp_path, deployments, message):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"autoscaling": {"deployments": deployments}}))
    with pytest.raises(HelmError, match=message):
        render(values_files=(values,))


@pytest.mark.parametrize("base", sorted(BASES))
def test_helm_lint_strict_with_the_example(helm, base):
    command = [str(helm), "lint", "--strict", str(CHART_DIR)]
    for values_file in (*BASES[base], AUTOSCALING_EXAMPLE):
        command += ["--values", str(values_file)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
