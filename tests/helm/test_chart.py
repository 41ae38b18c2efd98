"""The chart's rendered output, validated offline: the RayService against KubeRay's CRD schema,
serveConfigV2 against Ray Serve's schema and the project's AppConfig, built-in kinds against the
Kubernetes schemas; plus the behaviours values promise (GPU placement, pinning, failures)."""

from __future__ import annotations

import copy
import re
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from speccascade.k8s import HelmError, select_kind

from .conftest import CHART_DIR, GPU_EXAMPLE, KUBERNETES_VERSION

# Deployment replicas each worker pod hosts, per values file (the pod advertises this many units).
CASES = {
    "default": {"values_files": (), "replicas_per_pod": {"drafter": 1, "expert": 1}},
    "gpu-production": {"values_files": (GPU_EXAMPLE,), "replicas_per_pod": {"drafter": 1, "expert": 2}},
}


def rayservice_of(objects: list[dict]) -> dict:
    (service,) = select_kind(objects, "RayService", "ray.io/v1")
    return service


def serve_config_of(service: dict) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def app_of(service: dict) -> dict:
    (app,) = serve_config_of(service)["applications"]
    return app


def worker_groups(service: dict) -> dict[str, dict]:
    """Worker groups by the tier label the chart puts on their pods."""
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return {g["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: g for g in groups}


def grpc_service_of(objects: list[dict]) -> dict:
    (service,) = [s for s in select_kind(objects, "Service", "v1") if s["metadata"]["name"].endswith("-grpc")]
    return service


def pod_templates(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def ray_resources_of(group_spec: dict, is_head: bool) -> dict:
    """What the Ray autoscaler believes a pod of this group provides (its own parser)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    return _get_ray_resources_from_group_spec(copy.deepcopy(group_spec), is_head)


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected, as the API server's strict field validation
    does (a structural schema otherwise prunes a misspelt field silently)."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, render):
    spec = CASES[request.param]
    return {**spec, "name": request.param, "objects": render(values_files=spec["values_files"])}


# ------------------------------------------------------------------------------- offline validation

@pytest.mark.parametrize("values_files", [(), (GPU_EXAMPLE,)], ids=["default", "gpu-production"])
def test_helm_lint_strict(helm, values_files):
    command = [str(helm), "lint", "--strict", str(CHART_DIR)]
    for values_file in values_files:
        command += ["--values", str(values_file)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rayservice_matches_kuberay_crd_schema(case, rayservice_schema):
    service = rayservice_of(case["objects"])
    jsonschema.Draft7Validator(strict(rayservice_schema)).validate(service)


def test_strict_crd_schema_rejects_a_misspelt_field(case, rayservice_schema):
    service = copy.deepcopy(rayservice_of(case["objects"]))
    service["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = True
    with pytest.raises(jsonschema.ValidationError, match="enableInTreeAutoScaling"):
        jsonschema.Draft7Validator(strict(rayservice_schema)).validate(service)


def test_serve_config_is_valid_for_ray_serve_and_app_config(case):
    from ray.serve.schema import ServeDeploySchema
    from speccascade.app import GRPC_SERVICER_FUNCTIONS
    from speccascade.config.app import AppConfig

    config = ServeDeploySchema.model_validate(serve_config_of(rayservice_of(case["objects"])))
    (app,) = config.applications
    assert app.import_path == "speccascade.app:build_app"
    assert config.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS
    AppConfig.model_validate(app.args)


def serve_deployments(args: dict) -> dict[str, dict]:
    """Deployment name -> ray_actor_options, as the application builder really sets them."""
    from ray.serve.deployment import Application
    from speccascade.app import build_app

    options, pending = {}, [build_app(args)]
    while pending:
        deployment = pending.pop()._bound_deployment
        options[deployment.name] = deployment.ray_actor_options
        pending += [a for a in (*deployment.init_args, *deployment.init_kwargs.values()) if isinstance(a, Application)]
    return options


def test_builtin_kinds_are_valid_kubernetes(case):
    service = rayservice_of(case["objects"])
    builtin = [obj for obj in case["objects"] if "." not in obj["apiVersion"].split("/")[0] or
               obj["apiVersion"].startswith("networking.k8s.io/")]
    # Every Ray pod template, as the Pod KubeRay will create from it.
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pod-{i}", **t["metadata"]}, "spec": t["spec"]}
            for i, t in enumerate(pod_templates(service))]
    for obj in builtin + pods:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    # The `helm test` pod is rendered too (helm template includes test hooks) and validated with the rest.
    expected_kinds = {"default": ["Pod", "Service"], "gpu-production": ["Ingress", "Pod", "Service", "Service"]}[case["name"]]
    assert sorted(obj["kind"] for obj in builtin) == expected_kinds


def test_kubernetes_validate_catches_a_broken_service(case):
    broken = copy.deepcopy(grpc_service_of(case["objects"]))
    broken["spec"]["ports"][0]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# ------------------------------------------------------------------------ placement and resources

def replica_demand(ray_actor_options: dict) -> dict:
    """What Ray asks of a node for one replica with these options (Ray's own conversion)."""
    from ray._common.utils import resources_from_ray_options

    return resources_from_ray_options(ray_actor_options)


def fits(demand: dict, offer: dict, times: int = 1) -> bool:
    return all(offer.get(name, 0) >= amount * times for name, amount in demand.items() if amount)


def test_each_group_advertises_exactly_its_tier_resources(case):
    from speccascade.app import DRAFTER_DEPLOYMENT, EXPERT_DEPLOYMENT
    from speccascade.config.app import AppConfig

    service = rayservice_of(case["objects"])
    args = AppConfig.model_validate(app_of(service)["args"])
    deployments = serve_deployments(app_of(service)["args"])
    deployment_of = {"drafter": DRAFTER_DEPLOYMENT, "expert": EXPERT_DEPLOYMENT}
    groups = worker_groups(service)
    assert set(groups) == {"drafter", "expert"}
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    offers = {tier: ray_resources_of(group, is_head=False) for tier, group in groups.items()}
    offers["head"] = ray_resources_of(head, is_head=True)

    for tier in ("drafter", "expert"):
        placement = getattr(args, tier).placement
        per_pod = case["replicas_per_pod"][tier]
        # The tier's pinning resources, advertised exactly: perReplica x replicas per pod (and the
        # accelerator type, which Ray itself would only detect once the pod runs).
        custom = {k: v for k, v in offers[tier].items() if k not in {"CPU", "GPU", "memory"}}
        expected = {name: amount * per_pod for name, amount in placement.resources.items()}
        if placement.accelerator_type:
            expected[f"accelerator_type:{placement.accelerator_type}"] = 1
        assert custom == expected
        # A pod of the tier's group holds replicas_per_pod replicas of the deployment the builder
        # makes; no other group holds even one.
        demand = replica_demand(deployments[deployment_of[tier]])
        assert demand.get("GPU", 0) == placement.num_gpus
        assert fits(demand, offers[tier], per_pod)
        assert not any(fits(demand, offer) for name, offer in offers.items() if name != tier)


def test_set_values_with_integers_render_like_values_files(render):
    service = rayservice_of(render(set_values=[
        "tiers.drafter.rayResource.perReplica=2", "tiers.drafter.workerGroup.replicasPerPod=2",
        "tiers.drafter.workerGroup.replicas=2",
    ]))
    assert app_of(service)["args"]["drafter"]["placement"]["resources"] == {"drafter_tier": 2}
    drafter = worker_groups(service)["drafter"]
    assert ray_resources_of(drafter, is_head=False)["drafter_tier"] == 4
    assert drafter["replicas"] == 2


def test_router_fits_on_some_group(case):
    from speccascade.app import ROUTER_DEPLOYMENT

    service = rayservice_of(case["objects"])
    demand = replica_demand(serve_deployments(app_of(service)["args"])[ROUTER_DEPLOYMENT])
    cluster = service["spec"]["rayClusterConfig"]
    offers = [ray_resources_of(cluster["headGroupSpec"], is_head=True)]
    offers += [ray_resources_of(g, is_head=False) for g in cluster["workerGroupSpecs"]]
    assert any(fits(demand, offer) for offer in offers)


def test_gpu_settings_land_in_the_right_group(render):
    service = rayservice_of(render(values_files=(GPU_EXAMPLE,)))
    groups = worker_groups(service)
    drafter, expert = groups["drafter"]["template"]["spec"], groups["expert"]["template"]["spec"]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]

    assert drafter["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {t["spec"]["containers"][0]["image"] for t in pod_templates(service)} == {
        "registry.example.com/ml/speccascade:0.1.0-cuda"}  # the CUDA flavour of make image
    assert expert["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert drafter["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert expert["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert head["nodeSelector"] == {"node.kubernetes.io/pool": "cpu-system"}
    assert "tolerations" not in head and drafter["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "affinity" in expert and "affinity" not in drafter
    # The tenants file (tenantAuth.existingSecret) is mounted in every Ray pod; the model cache only in the expert's.
    assert {v["name"] for v in expert["volumes"]} == {"shared-memory", "tenants", "model-cache"}
    assert {v["name"] for v in drafter["volumes"]} == {"shared-memory", "tenants"}
    assert ray_resources_of(groups["expert"], is_head=False)["GPU"] == 4

    args = app_of(service)["args"]
    assert (args["drafter"]["placement"]["num_gpus"], args["drafter"]["placement"]["accelerator_type"]) == (1, "L4")
    assert (args["expert"]["placement"]["num_gpus"], args["expert"]["placement"]["accelerator_type"]) == (2, "A100")
    assert args["expert"]["model"] == "Qwen/Qwen2.5-Coder-32B-Instruct"
    # GPU tiers run the static backend, each batch fitting its slots (AppConfig refuses otherwise).
    assert (args["drafter"]["backend"], args["drafter"]["device"]) == ("static", "cuda")
    assert (args["expert"]["backend"], args["expert"]["device"]) == ("static", "auto")  # two GPUs a replica
    for tier in ("drafter", "expert"):
        assert args[tier]["static"]["slots"] >= args[tier]["max_batch_size"]
    assert groups["expert"]["idleTimeoutSeconds"] == 900
    assert (groups["drafter"]["minReplicas"], groups["drafter"]["maxReplicas"]) == (2, 8)


def test_renamed_tier_resources_follow_into_both_sides(render):
    service = rayservice_of(render(set_values=["tiers.expert.rayResource.name=big_gpu_pool"]))
    assert app_of(service)["args"]["expert"]["placement"]["resources"] == {"big_gpu_pool": 1}
    assert ray_resources_of(worker_groups(service)["expert"], is_head=False)["big_gpu_pool"] == 1


# -------------------------------------------------------------------------------- clear failures

@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tiers": {"expert": {"workerGroup": {"resources": None}}}},
         "tiers.expert.workerGroup.resources must set both requests and limits"),
        ({"tiers": {"drafter": {"workerGroup": {"resources": {"requests": {"cpu": "1"}, "limits": None}}}}},
         "tiers.drafter.workerGroup.resources must set both requests and limits"),
        ({"head": {"resources": None}}, "head.resources must set both requests and limits"),
        ({"app": {"expert": {"placement": {"num_gpus": 1}}}},
         r'tiers.expert needs 1 GPUs per pod \(app.expert.placement.num_gpus=1 x .*limits\["nvidia.com/gpu"\] is 0'),
        ({"tiers": {"drafter": {"workerGroup": {"replicas": 3}}}},
         "tiers.drafter.workerGroup needs minReplicas <= replicas <= maxReplicas; got 1 <= 3 <= 2"),
        ({"app": {"drafter": {"replicas": {"max_replicas": 5}}}},
         "app.drafter.replicas.max_replicas=5 cannot fit: tiers.drafter.workerGroup.maxReplicas=2 pods x replicasPerPod=1"),
        ({"tiers": {"drafter": {"rayResource": {"perReplica": 0.5}}}},
         "tiers.drafter.rayResource.perReplica: Invalid type. Expected: integer"),
        ({"app": {"expert": {"placement": {"resources": {"expert_tier": 2}}}}},
         "app.expert.placement.resources.expert_tier: the chart sets the resources that pin tiers"),
        ({"app": {"drafter": {"placement": {"resources": {"expert_tier": 1}}}}},
         r"app.drafter.placement.resources.expert_tier: .*\(from tiers.expert.rayResource\)"),
        ({"tiers": {"drafter": {"rayResource": {"name": "expert_tier"}}}},
         "rayResource.name must differ"),
        ({"tiers": {"drafter": {"workerGroup": {"rayStartParams": {"resources": "x"}}}}},
         "tiers.drafter.workerGroup.rayStartParams.resources is set by the chart"),
        ({"tenantAuth": {"required": True}}, "tenantAuth.required is true but tenantAuth.existingSecret is empty"),
        ({"tenantAuth": {"existingSecret": "keys"}, "app": {"tenancy": {"tenants_file": "/x.yaml"}}},
         "app.tenancy.tenants_file: the chart sets it"),
    ],
    ids=["tier-without-resources", "tier-without-limits", "head-without-resources", "gpus-missing",
         "initial-pods-out-of-bounds",
         "replicas-cannot-fit", "fractional-ray-resource", "own-pin-in-app", "other-pin-in-app",
         "shared-ray-resource", "own-resources-param", "tenants-required", "tenants-file-twice"],
)
def test_inconsistent_values_fail_with_a_clear_message(render, tmp_path, overrides, message):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(overrides))
    with pytest.raises(HelmError, match=message):
        render(values_files=(values,))


# ------------------------------------------------------------------------------ values behaviours

def test_image_overrides_reach_every_container(render):
    service = rayservice_of(render(set_values=[
        "image.repository=registry.internal/ml/speccascade", "image.tag=1.2.3", "image.pullPolicy=Always",
        "imagePullSecrets[0].name=regcred",
    ]))
    templates = pod_templates(service)
    assert len(templates) == 3
    for template in templates:
        (container,) = template["spec"]["containers"]
        assert container["image"] == "registry.internal/ml/speccascade:1.2.3"
        assert container["imagePullPolicy"] == "Always"
        assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_default_image_is_what_make_image_builds(render):
    app_version = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
    for template in pod_templates(rayservice_of(render())):
        assert template["spec"]["containers"][0]["image"] == f"speccascade:{app_version}-cpu"
        assert "imagePullSecrets" not in template["spec"]
    for template in pod_templates(rayservice_of(render(set_values=["image.flavour=cuda"]))):
        assert template["spec"]["containers"][0]["image"] == f"speccascade:{app_version}-cuda"


def test_an_unknown_image_flavour_fails(render):
    with pytest.raises(HelmError, match='image.flavour must be one of the following: "cpu", "cuda"'):
        render(set_values=["image.flavour=rocm"])


def test_ingress_is_off_by_default(render):
    assert select_kind(render(), "Ingress") == []


def test_ingress_routes_grpc_to_the_serve_service_with_tls(render):
    objects = render(set_values=[
        "ingress.enabled=true", "ingress.className=nginx", "ingress.host=llm.corp.test",
        "ingress.tls[0].secretName=llm-tls", "ingress.tls[0].hosts[0]=llm.corp.test",
    ])
    (ingress,) = select_kind(objects, "Ingress", "networking.k8s.io/v1")
    kubernetes_validate.validate(ingress, KUBERNETES_VERSION, strict=True)
    grpc_service = grpc_service_of(objects)
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert rule["host"] == "llm.corp.test"
    assert backend["name"] == grpc_service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in grpc_service["spec"]["ports"]}
    assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.corp.test"]}]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"


def test_http_ingress_routes_the_openai_api_to_serves_http_service_beside_the_grpc_ingress(render):
    assert select_kind(render(set_values=["ingress.enabled=true"]), "Ingress") != []
    assert [i["metadata"]["name"] for i in select_kind(render(), "Ingress")] == []
    objects = render(set_values=[
        "ingress.enabled=true", "ingress.host=llm.corp.test", "httpIngress.enabled=true", "httpIngress.className=nginx",
        "serve.httpPort=8100", "httpIngress.tls[0].secretName=llm-tls", "httpIngress.tls[0].hosts[0]=llm.corp.test",
    ])
    grpc_ingress, http_ingress = sorted(select_kind(objects, "Ingress", "networking.k8s.io/v1"),
                                        key=lambda ingress: ingress["metadata"]["name"])
    kubernetes_validate.validate(http_ingress, KUBERNETES_VERSION, strict=True)
    assert http_ingress["metadata"]["name"] == "speccascade-http"
    assert "annotations" not in http_ingress["metadata"]  # not the gRPC Ingress's backend-protocol GRPC
    (rule,) = http_ingress["spec"]["rules"]
    assert rule["host"] == grpc_ingress["spec"]["rules"][0]["host"] == "llm.corp.test"  # one host for both APIs
    paths = {p["path"]: p["backend"]["service"] for p in rule["http"]["paths"]}
    (ray_service,) = select_kind(objects, "RayService")
    serve_service = {"name": f"{ray_service['metadata']['name']}-serve-svc", "port": {"number": 8100}}
    assert paths == {path: serve_service for path in ("/v1", "/health", "/tokenize", "/detokenize", "/tokenizer_info")}
    assert http_ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.corp.test"]}]
    assert http_ingress["spec"]["ingressClassName"] == "nginx"


def test_http_ingress_on_its_own_host_needs_a_host(render):
    (ingress,) = select_kind(render(set_values=["httpIngress.enabled=true", "httpIngress.host=api.corp.test"]),
                             "Ingress")
    assert ingress["spec"]["rules"][0]["host"] == "api.corp.test"
    with pytest.raises(HelmError, match="httpIngress.host"):
        render(set_values=["httpIngress.enabled=true", "ingress.host="])
    with pytest.raises(HelmError, match="paths"):
        render(set_values=["httpIngress.enabled=true", "httpIngress.paths[0]=v1"])


def test_grpc_port_is_exposed_end_to_end(render):
    objects = render(set_values=["serve.grpcPort=9100", "serve.httpPort=8100", "service.grpcPort=443"])
    service = rayservice_of(objects)
    assert serve_config_of(service)["grpc_options"]["port"] == 9100
    assert serve_config_of(service)["http_options"]["port"] == 8100
    (port,) = grpc_service_of(objects)["spec"]["ports"]
    assert (port["port"], port["targetPort"], port["appProtocol"]) == (443, "grpc", "grpc")
    # Serve proxies run on every node, so every pod names both Serve ports; KubeRay probes a
    # proxy's health over HTTP on the port named `serve`.
    for template in pod_templates(service):
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert (ports["grpc"], ports["serve"]) == (9100, 8100)


def test_grpc_service_selects_the_serving_ray_pods_of_this_release(case):
    selector = dict(grpc_service_of(case["objects"])["spec"]["selector"])
    # KubeRay sets ray.io/serve=true on worker pods (gated by their proxy readiness probe) and
    # flips it on the head pod by the same health check.
    assert selector.pop("ray.io/serve") == "true"
    assert selector == {"app.kubernetes.io/name": "speccascade", "app.kubernetes.io/instance": "speccascade"}
    for template in pod_templates(rayservice_of(case["objects"])):
        assert selector.items() <= template["metadata"]["labels"].items()


def test_grpc_service_of_another_release_selects_other_pods(render):
    selector = grpc_service_of(render(release="other"))["spec"]["selector"]
    for template in pod_templates(rayservice_of(render())):
        assert not selector.items() <= {**template["metadata"]["labels"], "ray.io/serve": "true"}.items()


def test_autoscaling_policy_is_rendered_only_when_set(render, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    assert "autoscaling_policy" not in app_of(rayservice_of(render()))
    policy = {"policy_function": "speccascade.autoscale.policy:DeferralAwarePolicy",
              "policy_kwargs": {"expert": {"target_utilization": 0.7}}}
    values = tmp_path / "autoscaling.yaml"
    values.write_text(yaml.safe_dump({"autoscaling": {"autoscalingPolicy": policy}}))
    config = serve_config_of(rayservice_of(render(values_files=(values,))))
    assert config["applications"][0]["autoscaling_policy"] == policy
    ServeDeploySchema.model_validate(config)


def test_policy_values_become_app_config_defaults(render):
    from speccascade.config.app import AppConfig

    service = rayservice_of(render(set_values=["app.policy.rule=chow", "app.policy.block_size=7"],
                                   set_json=["app.policy.alpha=0.2"]))
    policy = AppConfig.model_validate(app_of(service)["args"]).policy
    assert (policy.rule.value, policy.alpha, policy.block_size) == ("chow", 0.2, 7)


def test_router_values_become_app_config(render):
    from speccascade.config.app import AppConfig

    service = rayservice_of(render(set_values=[
        "app.router.tier_call_timeout_s=30", "app.router.tier_call_attempts=5", "app.router.tier_down_cooldown_s=2",
        "app.router.replicas.min_replicas=2", "app.router.replicas.max_replicas=3",
        "app.router.placement.resources.router_pool=1"]))
    router = AppConfig.model_validate(app_of(service)["args"]).router
    assert (router.tier_call_timeout_s, router.tier_call_attempts, router.tier_down_cooldown_s) == (30, 5, 2)
    assert (router.replicas.min_replicas, router.replicas.max_replicas) == (2, 3)
    assert router.placement.resources == {"router_pool": 1}


def test_every_tier_field_is_settable_and_reaches_app_config(render):
    """Fields the chart's own layout once left out (torch_threads, the backend and device)."""
    from speccascade.config.app import AppConfig

    service = rayservice_of(render(set_values=[
        "app.drafter.torch_threads=3", "app.expert.backend=static", "app.expert.device=cuda:1",
        "app.expert.static.slots=32", "app.expert.static.max_len=1024", "app.expert.static.cuda_graphs=false",
        "app.expert.static.graph_memory_mb=512",
        "app.drafter.placement.memory_bytes=2147483648", "app.expert.replicas.initial_replicas=2"]))
    config = AppConfig.model_validate(app_of(service)["args"])
    assert config.drafter.torch_threads == 3
    assert (config.expert.backend, config.expert.device) == ("static", "cuda:1")
    assert config.expert.backend_options() == {"slots": 32, "max_len": 1024, "cuda_graphs": False,
                                               "graph_memory_mb": 512, "max_batch": 8}
    assert config.drafter.placement.ray_actor_options()["memory"] == 2147483648
    assert config.expert.replicas.initial_replicas == 2
    # The chart's only addition: each tier's pinning resource.
    assert config.expert.placement.resources == {"expert_tier": 1}


def test_the_tenants_file_is_the_referenced_secret_mounted_where_the_router_reads_it(render):
    import yaml
    from speccascade.config.app import AppConfig

    open_service = rayservice_of(render())
    assert AppConfig.model_validate(
        yaml.safe_load(open_service["spec"]["serveConfigV2"])["applications"][0]["args"]).tenancy.tenants_file is None
    for template in pod_templates(open_service):
        assert not any(v["name"] == "tenants" for v in template["spec"]["volumes"])
    service = rayservice_of(render(set_values=["tenantAuth.existingSecret=tenant-keys"]))
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert AppConfig.model_validate(args).tenancy.tenants_file == "/etc/speccascade/tenants/tenants.yaml"
    for template in pod_templates(service):
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == "tenants")
        assert volume["secret"] == {"secretName": "tenant-keys", "items": [{"key": "tenants.yaml",
                                                                            "path": "tenants.yaml"}]}
        mount = next(m for m in template["spec"]["containers"][0]["volumeMounts"] if m["name"] == "tenants")
        # A whole-directory mount (no subPath): the kubelet updates it in place when the Secret changes.
        assert mount == {"name": "tenants", "mountPath": "/etc/speccascade/tenants", "readOnly": True}


def test_the_resume_key_secret_is_mounted_in_every_ray_pod_and_named_in_the_router_config(render):
    from speccascade.config.app import AppConfig

    unset = rayservice_of(render())
    assert AppConfig.model_validate(app_of(unset)["args"]).router.resume_key_file is None
    assert not any(v["name"] == "resume-key" for t in pod_templates(unset) for v in t["spec"]["volumes"])
    service = rayservice_of(render(set_values=["resumeKey.existingSecret=stream-key"]))
    assert AppConfig.model_validate(app_of(service)["args"]).router.resume_key_file == \
        "/etc/speccascade/resume-key/resume.key"
    for template in pod_templates(service):  # every replica of the router, wherever it runs, reads the same key
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == "resume-key")
        assert volume["secret"] == {"secretName": "stream-key", "items": [{"key": "resume.key", "path": "resume.key"}]}
        mount = next(m for m in template["spec"]["containers"][0]["volumeMounts"] if m["name"] == "resume-key")
        assert mount == {"name": "resume-key", "mountPath": "/etc/speccascade/resume-key", "readOnly": True}
    with pytest.raises(HelmError, match="app.router.resume_key_file: the chart sets it"):
        render(set_values=["resumeKey.existingSecret=stream-key", "app.router.resume_key_file=/x.key"])



def test_every_ray_pod_is_scraped_on_its_metrics_port(case):
    service = rayservice_of(case["objects"])
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        template = group["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert str(ports["metrics"]) == annotations["prometheus.io/port"] == group["rayStartParams"]["metrics-export-port"]


def test_service_monitor_selects_the_metrics_service_which_selects_ray_pods(render):
    objects = render(set_values=["metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom"])
    (monitor,) = select_kind(objects, "ServiceMonitor", "monitoring.coreos.com/v1")
    (metrics_service,) = [s for s in select_kind(objects, "Service") if s["metadata"]["name"].endswith("-metrics")]
    kubernetes_validate.validate(metrics_service, KUBERNETES_VERSION, strict=True)
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics_service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == metrics_service["spec"]["ports"][0]["name"]
    for template in pod_templates(rayservice_of(objects)):
        assert metrics_service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert select_kind(render(), "ServiceMonitor") == []


def test_the_network_policy_lets_ray_pods_talk_and_others_reach_only_the_api_metrics_and_operator_ports(render,
                                                                                                       tmp_path):
    """Ray pods of the release reach each other on every port (Ray's own traffic, and the tiers'
    direct channels on ephemeral ports); clients, Prometheus and the KubeRay operator reach only
    their ports, from the peers the values name (the dashboard also takes Ray jobs: never open)."""
    operator = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}]
    clients = [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {"enabled": True, "operator": operator, "clients": clients}}))
    objects = render(values_files=(values,))
    (policy,) = select_kind(objects, "NetworkPolicy", "networking.k8s.io/v1")
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    spec = policy["spec"]
    ray_pods = spec["podSelector"]
    assert ray_pods["matchExpressions"] == [{"key": "ray.io/node-type", "operator": "Exists"}]  # KubeRay's label
    for template in pod_templates(rayservice_of(objects)):
        assert ray_pods["matchLabels"].items() <= template["metadata"]["labels"].items()
    (test_pod,) = [p for p in select_kind(objects, "Pod") if p["metadata"]["labels"].get("app.kubernetes.io/component") == "test"]
    assert "ray.io/node-type" not in test_pod["metadata"]["labels"]  # a client, not a Ray pod
    among_themselves, api, metrics, kuberay = spec["ingress"]
    assert among_themselves == {"from": [{"podSelector": ray_pods}]} and spec["policyTypes"] == ["Ingress"]
    container_ports = {p["name"]: p["containerPort"] for p in pod_templates(rayservice_of(objects))[0]["spec"]["containers"][0]["ports"]}
    assert {p["port"] for p in api["ports"]} == {container_ports["grpc"], container_ports["serve"]}
    assert api["from"] == clients
    assert [p["port"] for p in metrics["ports"]] == [container_ports["metrics"]] and "from" not in metrics  # any
    assert {p["port"] for p in kuberay["ports"]} == {container_ports["dashboard"], 52365} and kuberay["from"] == operator
    assert select_kind(render(), "NetworkPolicy") == []  # off by default


def test_a_network_policy_without_the_operators_place_fails(render):
    with pytest.raises(HelmError, match="networkPolicy.operator must name where the KubeRay operator runs"):
        render(set_values=["networkPolicy.enabled=true"])


# ------------------------------------------------------------------------------------ chart hygiene

def test_one_pod_template_serves_every_group():
    templates = "\n".join(p.read_text() for p in (CHART_DIR / "templates").iterdir() if p.is_file())
    assert templates.count("containers:") == 1


def test_every_value_is_documented():
    """Each value carries a `# --` comment, on itself or on an enclosing value (a documented map
    like `resources` covers its inline contents); plain sections need none."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    key = re.compile(r"^(\s*)([\w./-]+):(.*)$")
    undocumented = []
    documented_ancestors: list[tuple[int, bool]] = []  # (indent, documented) of enclosing keys
    for index, line in enumerate(lines):
        match = key.match(line)
        if not match:
            continue
        indent, name, rest = len(match.group(1)), match.group(2), match.group(3)
        while documented_ancestors and documented_ancestors[-1][0] >= indent:
            documented_ancestors.pop()
        comments = []
        for previous in reversed(lines[:index]):
            if not previous.strip().startswith("#"):
                break
            comments.append(previous.strip())
        documented = any(c.startswith("# --") for c in comments)
        covered = documented or any(d for _, d in documented_ancestors)
        following = next((ln for ln in lines[index + 1:] if ln.strip() and not ln.strip().startswith("#")), "")
        is_section = (not rest.strip() and bool(key.match(following))
                      and len(following) - len(following.lstrip()) > indent)
        if not is_section and not covered:
            undocumented.append(f"line {index + 1}: {name}")
        documented_ancestors.append((indent, documented))
    assert undocumented == []
