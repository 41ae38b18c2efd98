"""apply_rayservice and read_status against a fake API server: the requests they make (method,
path, query, content type, body) and what they make of the answers."""

from __future__ import annotations

import copy

import pytest
from kubernetes.client import CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from speccascade.k8s import apply_rayservice, format_status, merge_patch, read_status

NAMESPACE = "serving"
SERVICE_PATH = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices/speccascade"
COLLECTION_PATH = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices"
CLUSTER = "speccascade-raycluster-abcde"
CLUSTER_PATH = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters/{CLUSTER}"
PODS_PATH = f"/api/v1/namespaces/{NAMESPACE}/pods"
SERVE_DETAILS_PATH = f"/api/v1/namespaces/{NAMESPACE}/services/speccascade-head-svc:dashboard/proxy/api/serve/applications/"
SERVE_CONFIG = """\
applications:
- name: speccascade
  import_path: speccascade.app:build_app
  args:
    drafter: {model: small, placement: {num_gpus: 1, resources: {drafter_tier: 1}}}
    expert: {model: large, placement: {num_gpus: 2, resources: {expert_tier: 1}}}
"""


def worker_group(tier: str, replicas: int, low: int, high: int) -> dict:
    return {
        "groupName": f"{tier}-group", "replicas": replicas, "minReplicas": low, "maxReplicas": high,
        "rayStartParams": {"resources": f'"{{\\"{tier}_tier\\":1}}"'},
        "template": {"metadata": {"labels": {"app.kubernetes.io/component": tier}},
                     "spec": {"containers": [{"name": "ray-worker", "image": "speccascade:0.1.0"}]}},
    }


def desired_service() -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": "speccascade", "labels": {"app.kubernetes.io/instance": "speccascade"}},
        "spec": {
            "serveConfigV2": SERVE_CONFIG,
            "rayClusterConfig": {
                "rayVersion": "2.60.0", "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"idleTimeoutSeconds": 300},
                "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": []}}},
                "workerGroupSpecs": [worker_group("drafter", 1, 1, 2), worker_group("expert", 1, 1, 2)],
            },
        },
    }


def apply_patch(target, patch):
    """RFC 7386 merge-patch application, to check merge_patch's output round-trips."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_patch(result.get(key), value)
    return result


# -------------------------------------------------------------------------------------- merge patch

@pytest.mark.parametrize(
    ("live", "desired", "expected"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1, "gone": {"x": 1}}, {"a": 1}, {"gone": None}),
        ({"m": {"keep": 1, "old": 2}}, {"m": {"keep": 1, "new": 3}}, {"m": {"old": None, "new": 3}}),
        ({"l": [1, 2, 3]}, {"l": [1, 2]}, {"l": [1, 2]}),
        ({"m": {"x": 1}}, {"m": "scalar"}, {"m": "scalar"}),
    ],
    ids=["equal", "changed", "removed", "nested", "list-replaced", "type-changed"],
)
def test_merge_patch_is_minimal_and_round_trips(live, desired, expected):
    patch = merge_patch(live, desired)
    assert patch == expected
    assert apply_patch(live, patch) == desired


# -------------------------------------------------------------------------------------------- apply

def test_apply_creates_the_rayservice_when_it_is_missing(apiserver, api_client):
    desired = desired_service()
    apiserver.route("POST", COLLECTION_PATH, 201, desired)

    result = apply_rayservice(CustomObjectsApi(api_client), desired, NAMESPACE)

    assert result.action == "created"
    get, post = apiserver.requests
    assert (get.method, get.path) == ("GET", SERVICE_PATH)
    assert (post.method, post.path) == ("POST", COLLECTION_PATH)
    assert post.query == {"fieldManager": "speccascade"}
    expected = copy.deepcopy(desired)
    expected["metadata"]["namespace"] = NAMESPACE
    assert post.body == expected


def test_apply_merge_patches_an_existing_rayservice(apiserver, api_client):
    desired = desired_service()
    live = copy.deepcopy(desired)
    live["metadata"].update(namespace=NAMESPACE, resourceVersion="4711",
                            annotations={"owned-by-someone-else": "keep"}, labels={"team": "ml"})
    live["spec"]["serveConfigV2"] = "applications: []\n"
    live["spec"]["upgradeStrategy"] = {"type": "NewCluster"}  # removed from the chart's values since
    live["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Aggressive"
    live["status"] = {"serviceStatus": "Running"}
    apiserver.route("GET", SERVICE_PATH, 200, live)
    apiserver.route("PATCH", SERVICE_PATH, 200, desired)

    result = apply_rayservice(CustomObjectsApi(api_client), desired, NAMESPACE)

    assert result.action == "patched"
    get, patch = apiserver.requests
    assert (patch.method, patch.path) == ("PATCH", SERVICE_PATH)
    assert patch.content_type == "application/merge-patch+json"
    assert patch.query == {"fieldManager": "speccascade"}
    assert patch.body == {
        # Only the chart's own label is set; others' labels and annotations are left alone.
        "metadata": {"labels": {"app.kubernetes.io/instance": "speccascade"}, "resourceVersion": "4711"},
        "spec": {
            "serveConfigV2": SERVE_CONFIG,
            "upgradeStrategy": None,
            "rayClusterConfig": {"autoscalerOptions": {"upscalingMode": None}},
        },
    }
    assert apply_patch(live["spec"], patch.body["spec"]) == desired["spec"]


def test_apply_sends_nothing_when_the_rayservice_is_up_to_date(apiserver, api_client):
    live = desired_service()
    live["metadata"].update(namespace=NAMESPACE, resourceVersion="9")
    apiserver.route("GET", SERVICE_PATH, 200, live)

    result = apply_rayservice(CustomObjectsApi(api_client), desired_service(), NAMESPACE)

    assert result.action == "unchanged"
    assert [r.method for r in apiserver.requests] == ["GET"]


def test_apply_dry_run_asks_the_server_not_to_persist(apiserver, api_client):
    apiserver.route("POST", COLLECTION_PATH, 201, desired_service())
    apply_rayservice(CustomObjectsApi(api_client), desired_service(), NAMESPACE, dry_run=True)
    assert apiserver.requests[-1].query == {"dryRun": "All", "fieldManager": "speccascade"}


def test_apply_does_not_create_on_errors_other_than_not_found(apiserver, api_client):
    apiserver.route("GET", SERVICE_PATH, 403, {"kind": "Status", "code": 403, "reason": "Forbidden"})
    with pytest.raises(ApiException) as raised:
        apply_rayservice(CustomObjectsApi(api_client), desired_service(), NAMESPACE)
    assert raised.value.status == 403
    assert [r.method for r in apiserver.requests] == ["GET"]


def test_apply_refuses_anything_but_a_rayservice(api_client):
    other = {**desired_service(), "kind": "RayCluster"}
    with pytest.raises(ValueError, match="RayCluster"):
        apply_rayservice(CustomObjectsApi(api_client), other, NAMESPACE)


# ------------------------------------------------------------------------------------------- status

def live_service(*, app_status="RUNNING", expert_status="HEALTHY", ready="True", with_cluster=True) -> dict:
    service = desired_service()
    status = {
        "serviceStatus": "Running" if ready == "True" else "",
        "numServeEndpoints": 3,
        "conditions": [{"type": "Ready", "status": ready, "reason": "NonZeroServeEndpoints"},
                       {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster"}],
    }
    if with_cluster:
        status["activeServiceStatus"] = {
            "rayClusterName": CLUSTER,
            "applicationStatuses": {"speccascade": {
                "status": app_status,
                "serveDeploymentStatuses": {
                    "Router": {"status": "HEALTHY"},
                    "Drafter": {"status": "HEALTHY"},
                    "Expert": {"status": expert_status,
                               **({"message": "replica failed to start"} if expert_status != "HEALTHY" else {})},
                },
            }},
        }
    service["status"] = status
    return service


def pod(name: str, group: str, *, ready: bool) -> dict:
    return {
        "metadata": {"name": name, "labels": {"ray.io/cluster": CLUSTER, "ray.io/group": group,
                                              "ray.io/node-type": "worker"}},
        "status": {"phase": "Running" if ready else "Pending",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def route_cluster(apiserver) -> None:
    # The autoscaler has raised the expert group to 3 pods in the live RayCluster.
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": CLUSTER},
               "spec": {"workerGroupSpecs": [worker_group("drafter", 1, 1, 2), worker_group("expert", 3, 1, 4)]}}
    apiserver.route("GET", CLUSTER_PATH, 200, cluster)
    apiserver.route("GET", PODS_PATH, 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
        pod("d-1", "drafter-group", ready=True),
        pod("e-1", "expert-group", ready=True),
        pod("e-2", "expert-group", ready=True),
        pod("e-3", "expert-group", ready=False),
    ]})


def serve_deployment(resources: dict, states: list[str], target: int) -> dict:
    return {"status": "HEALTHY", "target_num_replicas": target,
            "deployment_config": {"name": "x", "ray_actor_options": {"num_cpus": 1, "resources": resources}},
            "replicas": [{"replica_id": f"r{i}", "state": state} for i, state in enumerate(states)]}


def route_serve_details(apiserver) -> None:
    apiserver.route("GET", SERVE_DETAILS_PATH, 200, {"applications": {"speccascade": {"status": "RUNNING", "deployments": {
        "Router": serve_deployment({}, ["RUNNING"], 1),
        "Drafter": serve_deployment({"drafter_tier": 1}, ["RUNNING"], 1),
        "Expert": serve_deployment({"expert_tier": 1}, ["RUNNING", "RUNNING", "STARTING"], 3),
    }}}})


def test_status_reads_service_cluster_pods_and_serve_replicas(apiserver, api_client):
    apiserver.route("GET", SERVICE_PATH, 200, live_service())
    route_cluster(apiserver)
    route_serve_details(apiserver)

    status = read_status(CustomObjectsApi(api_client), CoreV1Api(api_client), NAMESPACE, "speccascade")

    assert [(r.method, r.path) for r in apiserver.requests] == [
        ("GET", SERVICE_PATH), ("GET", CLUSTER_PATH), ("GET", PODS_PATH), ("GET", SERVE_DETAILS_PATH)]
    assert apiserver.requests[2].query == {"labelSelector": f"ray.io/cluster={CLUSTER},ray.io/node-type=worker"}
    assert status.healthy and status.ready and status.active_cluster == CLUSTER
    tiers = {t.tier: t for t in status.tiers}
    assert (tiers["drafter"].ready_pods, tiers["drafter"].pods, tiers["drafter"].desired) == (1, 1, 1)
    assert (tiers["expert"].ready_pods, tiers["expert"].pods, tiers["expert"].desired) == (2, 3, 3)
    assert (tiers["expert"].min_replicas, tiers["expert"].max_replicas, tiers["expert"].group) == (1, 4, "expert-group")
    (app,) = status.applications
    assert app.deployments == {"Drafter": "HEALTHY", "Expert": "HEALTHY", "Router": "HEALTHY"}
    replicas = {r.deployment: (r.tier, r.running, r.target) for r in status.replicas}
    assert replicas == {"Router": (None, 1, 1), "Drafter": ("drafter", 1, 1), "Expert": ("expert", 2, 3)}
    text = format_status(status)
    assert "speccascade: RUNNING" in text and "2/3/3 [1..4]" in text and " healthy" in text
    assert "Expert [expert]: HEALTHY, 2/3 replicas" in text and "Router: HEALTHY, 1/1 replicas" in text


def test_status_without_serve_api_access_still_reports_the_rest(apiserver, api_client):
    apiserver.route("GET", SERVICE_PATH, 200, live_service())
    route_cluster(apiserver)
    apiserver.route("GET", SERVE_DETAILS_PATH, 403, {"kind": "Status", "code": 403, "reason": "Forbidden"})

    status = read_status(CustomObjectsApi(api_client), CoreV1Api(api_client), NAMESPACE, "speccascade")

    assert status.replicas is None and status.replicas_error.startswith("Serve API unreachable: 403")
    assert status.healthy and len(status.tiers) == 2
    assert "serve replica counts unavailable: Serve API unreachable: 403" in format_status(status)


def test_status_reports_an_unhealthy_deployment(apiserver, api_client):
    apiserver.route("GET", SERVICE_PATH, 200, live_service(app_status="DEPLOYING", expert_status="UNHEALTHY"))
    route_cluster(apiserver)

    status = read_status(CustomObjectsApi(api_client), CoreV1Api(api_client), NAMESPACE, "speccascade")

    assert not status.healthy
    text = format_status(status)
    assert "NOT healthy" in text and "Expert: UNHEALTHY (replica failed to start)" in text


def test_status_before_the_first_cluster_is_up(apiserver, api_client):
    apiserver.route("GET", SERVICE_PATH, 200, live_service(ready="False", with_cluster=False))

    status = read_status(CustomObjectsApi(api_client), CoreV1Api(api_client), NAMESPACE, "speccascade")

    assert [r.path for r in apiserver.requests] == [SERVICE_PATH]  # no cluster to read pods from yet
    assert not status.healthy and status.ready is False
    assert [(t.tier, t.pods, t.desired) for t in status.tiers] == [("drafter", 0, 1), ("expert", 0, 1)]
    assert "none reported yet" in format_status(status)


def test_status_of_a_missing_rayservice_raises_not_found(apiserver, api_client):
    with pytest.raises(ApiException) as raised:
        read_status(CustomObjectsApi(api_client), CoreV1Api(api_client), NAMESPACE, "speccascade")
    assert raised.value.status == 404
