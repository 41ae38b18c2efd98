"""Read a KubeRay RayService's health (`speccascade k8s status`): its conditions, each Serve
application and deployment, the pods of each tier's worker group and the Serve replicas placed on
them, through the Kubernetes API (CustomObjectsApi, CoreV1Api and the head's Serve REST API by the
API server's service proxy)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml
from kubernetes.client import CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from .rayservice import (
    CLUSTER_LABEL,
    GROUP_LABEL,
    NODE_TYPE_LABEL,
    RAY_GROUP,
    RAY_VERSION,
    RAYCLUSTER_PLURAL,
    RAYSERVICE_PLURAL,
    TIER_LABEL,
)

SERVE_RUNNING = "RUNNING"
DEPLOYMENT_HEALTHY = "HEALTHY"
REPLICA_RUNNING = "RUNNING"
TIERS = ("drafter", "expert")
# Serve's REST API on the head's dashboard port, reached through the API server's service proxy
# (KubeRay names a RayService's head Service <name>-head-svc).
HEAD_SERVICE_SUFFIX = "-head-svc"
DASHBOARD_PORT_NAME = "dashboard"
SERVE_DETAILS_PATH = "api/serve/applications/"


@dataclass(frozen=True)
class TierReplicas:
    """One worker group: the autoscaler's target pod count, its bounds, and the pods that exist."""

    tier: str
    group: str
    desired: int
    min_replicas: int
    max_replicas: int
    pods: int
    ready_pods: int


@dataclass(frozen=True)
class DeploymentReplicas:
    """One Serve deployment's replicas, from Serve's own API: running now and Serve's target."""

    application: str
    deployment: str
    tier: str | None  # drafter / expert by the Ray resource pinning it; None for the router
    running: int
    target: int


@dataclass(frozen=True)
class ApplicationHealth:
    name: str
    status: str
    message: str
    deployments: dict[str, str]  # deployment name -> status (HEALTHY, UPDATING, UNHEALTHY, ...)
    deployment_messages: dict[str, str] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return self.status == SERVE_RUNNING and all(s == DEPLOYMENT_HEALTHY for s in self.deployments.values())


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    namespace: str
    service_status: str  # KubeRay's serviceStatus, e.g. "Running"
    ready: bool | None  # the Ready condition; None when the operator sets no conditions
    conditions: list[dict]
    active_cluster: str | None
    pending_cluster: str | None
    num_serve_endpoints: int
    applications: list[ApplicationHealth]
    tiers: list[TierReplicas]
    # Serve's replica counts; None (with the reason) when its API could not be reached.
    replicas: list[DeploymentReplicas] | None = None
    replicas_error: str | None = None

    @property
    def healthy(self) -> bool:
        service_up = self.ready if self.ready is not None else self.service_status == "Running"
        return bool(service_up and self.applications and all(app.healthy for app in self.applications))

    def to_dict(self) -> dict:
        return {**asdict(self), "healthy": self.healthy}


def _condition(conditions: list[dict], kind: str) -> bool | None:
    for condition in conditions:
        if condition.get("type") == kind:
            return condition.get("status") == "True"
    return None


def _applications(cluster_status: dict) -> list[ApplicationHealth]:
    apps = []
    for app_name, app in sorted((cluster_status.get("applicationStatuses") or {}).items()):
        deployments = app.get("serveDeploymentStatuses") or {}
        apps.append(ApplicationHealth(
            name=app_name,
            status=app.get("status", ""),
            message=app.get("message", ""),
            deployments={name: d.get("status", "") for name, d in sorted(deployments.items())},
            deployment_messages={name: d["message"] for name, d in sorted(deployments.items()) if d.get("message")},
        ))
    return apps


def _pod_ready(pod: Any) -> bool:
    status = pod.status
    if status is None or status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def _tiers(group_specs: list[dict], pods: list[Any]) -> list[TierReplicas]:
    pods_per_group: Counter = Counter()
    ready_per_group: Counter = Counter()
    for pod in pods:
        group = (pod.metadata.labels or {}).get(GROUP_LABEL)
        pods_per_group[group] += 1
        ready_per_group[group] += _pod_ready(pod)
    tiers = []
    for spec in group_specs:
        group = spec["groupName"]
        labels = (spec.get("template") or {}).get("metadata", {}).get("labels") or {}
        tiers.append(TierReplicas(
            tier=labels.get(TIER_LABEL, group),
            group=group,
            desired=int(spec.get("replicas", spec.get("minReplicas", 0)) or 0),
            min_replicas=int(spec.get("minReplicas", 0) or 0),
            max_replicas=int(spec.get("maxReplicas", 0) or 0),
            pods=pods_per_group[group],
            ready_pods=ready_per_group[group],
        ))
    return tiers


def _tier_of_resource(service: dict) -> dict[str, str]:
    """Ray resource name -> tier, from the tiers' placement in the RayService's Serve config."""
    try:
        config = yaml.safe_load((service.get("spec") or {}).get("serveConfigV2") or "") or {}
    except yaml.YAMLError:
        return {}
    tiers = {}
    for app in config.get("applications") or []:
        args = app.get("args") or {}
        for tier in TIERS:
            for resource in ((args.get(tier) or {}).get("placement") or {}).get("resources") or {}:
                tiers[resource] = tier
    return tiers


def _serve_replicas(details: dict, tier_of_resource: dict[str, str]) -> list[DeploymentReplicas]:
    replicas = []
    for app_name, app in sorted((details.get("applications") or {}).items()):
        for name, deployment in sorted((app.get("deployments") or {}).items()):
            options = (deployment.get("deployment_config") or {}).get("ray_actor_options") or {}
            tiers = {tier_of_resource[r] for r in options.get("resources") or {} if r in tier_of_resource}
            replicas.append(DeploymentReplicas(
                application=app_name,
                deployment=name,
                tier=tiers.pop() if len(tiers) == 1 else None,
                running=sum(r.get("state") == REPLICA_RUNNING for r in deployment.get("replicas") or []),
                target=int(deployment.get("target_num_replicas") or 0),
            ))
    return replicas


def read_serve_replicas(core: CoreV1Api, namespace: str, name: str, service: dict) -> list[DeploymentReplicas]:
    """Each Serve deployment's running and target replicas, from Serve's REST API on the head
    (through the API server's service proxy; needs `get` on `services/proxy`)."""
    # Unparsed: the client would turn the JSON body into the str() of a dict.
    response = core.connect_get_namespaced_service_proxy_with_path(
        f"{name}{HEAD_SERVICE_SUFFIX}:{DASHBOARD_PORT_NAME}", namespace, SERVE_DETAILS_PATH, _preload_content=False
    )
    try:
        details = json.loads(response.data)
    except json.JSONDecodeError as error:
        raise ValueError(f"Serve details are not JSON: {error}") from None
    if not isinstance(details, dict):
        raise ValueError(f"unexpected Serve details: {str(details)[:200]}")
    return _serve_replicas(details, _tier_of_resource(service))


def read_status(custom: CustomObjectsApi, core: CoreV1Api, namespace: str, name: str) -> ServiceStatus:
    """The RayService's status, each tier's worker pods (from the active RayCluster, whose replica
    counts the Ray autoscaler sets), the Serve applications' health and, when Serve's API answers,
    each deployment's replica counts."""
    service = custom.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAYSERVICE_PLURAL, name)
    status = service.get("status") or {}
    active = status.get("activeServiceStatus") or {}
    pending = status.get("pendingServiceStatus") or {}
    conditions = status.get("conditions") or []
    cluster_name = active.get("rayClusterName") or None

    group_specs = (service.get("spec") or {}).get("rayClusterConfig", {}).get("workerGroupSpecs") or []
    pods: list[Any] = []
    if cluster_name:
        try:
            cluster = custom.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, namespace, RAYCLUSTER_PLURAL, cluster_name
            )
            group_specs = (cluster.get("spec") or {}).get("workerGroupSpecs") or group_specs
        except ApiException as error:
            if error.status != 404:
                raise
        pods = core.list_namespaced_pod(
            namespace, label_selector=f"{CLUSTER_LABEL}={cluster_name},{NODE_TYPE_LABEL}=worker"
        ).items
        try:
            replicas, replicas_error = read_serve_replicas(core, namespace, name, service), None
        except ApiException as error:
            replicas, replicas_error = None, f"Serve API unreachable: {error.status} {error.reason}"
        except ValueError as error:
            replicas, replicas_error = None, f"Serve API answer unreadable: {error}"
    else:
        replicas, replicas_error = None, "no active Ray cluster yet"

    return ServiceStatus(
        name=name,
        namespace=namespace,
        service_status=status.get("serviceStatus") or "",
        ready=_condition(conditions, "Ready"),
        conditions=[{k: c.get(k) for k in ("type", "status", "reason", "message") if c.get(k)} for c in conditions],
        active_cluster=cluster_name,
        pending_cluster=pending.get("rayClusterName") or None,
        num_serve_endpoints=int(status.get("numServeEndpoints") or 0),
        applications=_applications(active),
        tiers=_tiers(group_specs, pods),
        replicas=replicas,
        replicas_error=replicas_error,
    )


def format_status(status: ServiceStatus) -> str:
    """A short human-readable report of `read_status`'s answer."""
    ready = {True: "Ready", False: "NotReady", None: "-"}[status.ready]
    lines = [
        f"RayService {status.namespace}/{status.name}: {status.service_status or '-'} ({ready}), "
        f"{status.num_serve_endpoints} serve endpoint(s), {'healthy' if status.healthy else 'NOT healthy'}",
        f"  active cluster: {status.active_cluster or '-'}"
        + (f"   pending (upgrade): {status.pending_cluster}" if status.pending_cluster else ""),
    ]
    for condition in status.conditions:
        if condition.get("status") != "True" or condition.get("type") != "Ready":
            detail = ": ".join(str(condition[k]) for k in ("reason", "message") if condition.get(k))
            lines.append(f"  condition {condition.get('type')}={condition.get('status')}" + (f" ({detail})" if detail else ""))
    lines.append("  tiers (worker pods ready / existing / autoscaler target, bounds):")
    if not status.tiers:
        lines.append("    none")
    for tier in status.tiers:
        lines.append(
            f"    {tier.tier:<10} group={tier.group:<12} {tier.ready_pods}/{tier.pods}/{tier.desired} "
            f"[{tier.min_replicas}..{tier.max_replicas}]"
        )
    counts = {(r.application, r.deployment): r for r in status.replicas or []}
    lines.append("  serve applications (deployment: health, replicas running/target):")
    if not status.applications:
        lines.append("    none reported yet")
    for app in status.applications:
        lines.append(f"    {app.name}: {app.status}" + (f" ({app.message})" if app.message else ""))
        for deployment, state in app.deployments.items():
            message = app.deployment_messages.get(deployment)
            replicas = counts.get((app.name, deployment))
            count = f", {replicas.running}/{replicas.target} replicas" if replicas else ""
            tier = f" [{replicas.tier}]" if replicas and replicas.tier else ""
            lines.append(f"      {deployment}{tier}: {state}{count}" + (f" ({message})" if message else ""))
    if status.replicas_error:
        lines.append(f"  serve replica counts unavailable: {status.replicas_error}")
    return "\n".join(lines)


def status_json(status: ServiceStatus) -> str:
    return json.dumps(status.to_dict(), indent=2, sort_keys=True)
