"""The chart's `helm test` pod: a test hook that runs the speccascade CLI of the application's own
image against the gRPC Service (health first, then one Generate call) and lists the models of the
OpenAI-compatible API on Serve's HTTP Service. tests/serve runs the very
same commands against a served application."""

from __future__ import annotations

import kubernetes_validate
from speccascade.cli import build_parser
from speccascade.k8s import select_kind

from .conftest import KUBERNETES_VERSION


def hook_pod(objects: list[dict]) -> dict:
    (pod,) = [p for p in select_kind(objects, "Pod", "v1") if p["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    return pod


def test_the_test_pod_is_a_valid_helm_test_hook(render):
    objects = render()
    pod = hook_pod(objects)
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    assert pod["spec"]["restartPolicy"] == "Never"
    (health,) = pod["spec"]["initContainers"]
    generate, models = pod["spec"]["containers"]
    (service,) = [s for s in select_kind(objects, "Service", "v1") if s["metadata"]["name"].endswith("-grpc")]
    target = f"--target={service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    (ray_service,) = select_kind(objects, "RayService")
    head = ray_service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for container, command in ((health, "health"), (generate, "client")):
        assert container["command"][:2] == ["speccascade", command]
        assert target in container["command"]
        assert container["image"] == head["image"]  # the application's own image and CLI
        args = build_parser().parse_args(container["command"][1:])  # a valid invocation of the CLI
        assert args.application == "speccascade"
    assert "--json" in generate["command"] and "--wait=300" in health["command"]
    assert models["command"][:2] == ["speccascade", "health"] and models["image"] == head["image"]
    assert f"--openai-url=http://{ray_service['metadata']['name']}-serve-svc:8000/v1" in models["command"]
    assert build_parser().parse_args(models["command"][1:]).openai_url


def test_the_test_pod_follows_the_values(render):
    pod = hook_pod(render(set_values=["tests.prompt=def square(x):", "tests.maxNewTokens=4", "service.grpcPort=9443",
                                      "imagePullSecrets[0].name=regcred", "serve.httpPort=8443"]))
    generate, models = pod["spec"]["containers"]
    assert "--openai-url=http://speccascade-serve-svc:8443/v1" in models["command"]
    assert generate["command"][-1] == "def square(x):" and "--max-new-tokens=4" in generate["command"]
    assert "--target=speccascade-grpc:9443" in generate["command"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_the_test_pod_can_be_left_out(render):
    assert [p for p in select_kind(render(set_values=["tests.enabled=false"]), "Pod")] == []



def test_with_tenants_the_test_pod_calls_with_a_tenants_key(render):
    # Without a key there is nothing the pod could call (NOTES.txt says so instead).
    assert select_kind(render(set_values=["tenantAuth.existingSecret=speccascade-tenants"]), "Pod") == []
    pod = hook_pod(render(set_values=["tenantAuth.existingSecret=speccascade-tenants",
                                      "tests.apiKeySecret.name=helm-test-key"]))
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    for container in pod["spec"]["containers"]:  # the Generate call and the HTTP model list
        assert container["env"] == [{"name": "SPECCASCADE_API_KEY",
                                     "valueFrom": {"secretKeyRef": {"name": "helm-test-key", "key": "api-key"}}}]
    assert "env" not in pod["spec"]["initContainers"][0]  # health needs no key
