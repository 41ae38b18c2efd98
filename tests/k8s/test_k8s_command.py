"""`speccascade k8s status|apply` end to end: the CLI with a kubeconfig pointing at the fake API
server, and (for apply) the real chart rendered by helm."""

from __future__ import annotations

import json

import pytest
from speccascade.cli import main
from speccascade.k8s import HelmError, find_helm, render_chart, select_kind

from ..helm.conftest import skip_or_fail_in_ci
from .test_rayservice import (
    COLLECTION_PATH,
    NAMESPACE,
    SERVICE_PATH,
    live_service,
    route_cluster,
    route_serve_details,
)


@pytest.fixture
def helm():
    try:
        return find_helm()
    except HelmError as error:
        skip_or_fail_in_ci(f"helm is not installed ({error})")


def test_status_prints_tiers_and_app_health(apiserver, kubeconfig, capsys):
    apiserver.route("GET", SERVICE_PATH, 200, live_service())
    route_cluster(apiserver)
    route_serve_details(apiserver)

    code = main(["k8s", "status", "--kubeconfig", str(kubeconfig), "-n", NAMESPACE])

    out = capsys.readouterr().out
    assert code == 0
    assert "RayService serving/speccascade: Running (Ready)" in out
    assert "expert" in out and "2/3/3 [1..4]" in out
    assert "Expert [expert]: HEALTHY, 2/3 replicas" in out
    assert apiserver.requests[0].path == SERVICE_PATH


def test_status_json_and_exit_code_when_unhealthy(apiserver, kubeconfig, capsys):
    apiserver.route("GET", SERVICE_PATH, 200, live_service(expert_status="UNHEALTHY"))
    route_cluster(apiserver)

    code = main(["k8s", "status", "--kubeconfig", str(kubeconfig), "-n", NAMESPACE, "--json"])

    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["healthy"] is False
    assert report["applications"][0]["deployments"]["Expert"] == "UNHEALTHY"
    assert {t["tier"]: t["pods"] for t in report["tiers"]} == {"drafter": 1, "expert": 3}
    assert report["replicas"] is None and "404" in report["replicas_error"]  # Serve API not routed


def test_status_of_a_missing_rayservice_is_a_clear_error(apiserver, kubeconfig, capsys):
    code = main(["k8s", "status", "--kubeconfig", str(kubeconfig), "-n", NAMESPACE, "--name", "nope"])
    assert code == 2
    assert "no RayService 'nope' in namespace 'serving'" in capsys.readouterr().err


def test_apply_creates_the_rendered_rayservice(apiserver, kubeconfig, helm, capsys):
    apiserver.route("POST", COLLECTION_PATH, 201, {})

    code = main(["k8s", "apply", "--kubeconfig", str(kubeconfig), "-n", NAMESPACE,
                 "--set", "image.tag=9.9.9", "--set", "ingress.enabled=true"])

    assert code == 0
    out = capsys.readouterr().out
    assert "rayservice serving/speccascade created" in out
    assert "Ingress" in out  # told that helm manages the other objects
    (rendered,) = select_kind(render_chart(namespace=NAMESPACE, set_values=["image.tag=9.9.9", "ingress.enabled=true"]),
                              "RayService")
    post = apiserver.requests[-1]
    assert (post.method, post.path) == ("POST", COLLECTION_PATH)
    assert post.body == {**rendered, "metadata": {**rendered["metadata"], "namespace": NAMESPACE}}
    head = post.body["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].endswith(":9.9.9")


def test_apply_patches_only_what_the_values_change(apiserver, kubeconfig, helm, capsys):
    (live,) = select_kind(render_chart(namespace=NAMESPACE), "RayService")
    live["metadata"].update(namespace=NAMESPACE, resourceVersion="17")
    apiserver.route("GET", SERVICE_PATH, 200, live)
    apiserver.route("PATCH", SERVICE_PATH, 200, live)

    code = main(["k8s", "apply", "--kubeconfig", str(kubeconfig), "-n", NAMESPACE,
                 "--set", "rayService.upgradeStrategy.type=NewCluster"])

    assert code == 0
    patch = apiserver.requests[-1]
    assert patch.method == "PATCH" and patch.content_type == "application/merge-patch+json"
    assert patch.body == {"metadata": {"resourceVersion": "17"}, "spec": {"upgradeStrategy": {"type": "NewCluster"}}}


def test_apply_reports_a_chart_failure_without_calling_the_api(apiserver, kubeconfig, helm, capsys):
    code = main(["k8s", "apply", "--kubeconfig", str(kubeconfig), "-n", NAMESPACE,
                 "--set", "tiers.expert.workerGroup.resources=null"])
    assert code == 2
    assert "tiers.expert.workerGroup.resources must set both requests and limits" in capsys.readouterr().err
    assert apiserver.requests == []


@pytest.mark.parametrize(("set_values", "message"), [
    (["app.expert.backend=static", "app.expert.max_batch_size=64"],
     "app.expert: static.slots=32 is below max_batch_size=64"),
    (["app.drafter.replicas.min_replicas=2", "app.drafter.replicas.initial_replicas=1"],
     "app.drafter.replicas: initial_replicas=1 is outside [2, 2]"),
], ids=["slots-below-batch", "initial-replicas-out-of-bounds"])
def test_apply_refuses_args_app_config_refuses_without_calling_the_api(apiserver, kubeconfig, helm, capsys,
                                                                        set_values, message):
    """Rules across fields are beyond the chart's JSON Schema; apply checks them with AppConfig
    before the cluster would learn of them from the Serve controller."""
    arguments = ["k8s", "apply", "--kubeconfig", str(kubeconfig), "-n", NAMESPACE]
    for value in set_values:
        arguments += ["--set", value]
    assert main(arguments) == 2
    assert message in capsys.readouterr().err
    assert apiserver.requests == []


def test_apply_passes_set_json_to_helm(apiserver, kubeconfig, helm):
    apiserver.route("POST", COLLECTION_PATH, 201, {})
    code = main(["k8s", "apply", "--kubeconfig", str(kubeconfig), "-n", NAMESPACE, "--set-json", "app.policy.alpha=0.25"])
    assert code == 0
    (post,) = [r for r in apiserver.requests if r.method == "POST"]
    assert "alpha: 0.25" in post.body["spec"]["serveConfigV2"]
