"""Apply a KubeRay RayService (`ray.io/v1`, plural `rayservices`) through the Kubernetes
API with the `kubernetes` client's CustomObjectsApi (its status is read in `status.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAYSERVICE_PLURAL = "rayservices"
RAYCLUSTER_PLURAL = "rayclusters"
# Custom resources take JSON merge patches (RFC 7386), not strategic merge patches.
MERGE_PATCH = "application/merge-patch+json"
FIELD_MANAGER = "speccascade"
# Labels KubeRay puts on the pods it creates, and the chart's tier label on each group's pods.
CLUSTER_LABEL = "ray.io/cluster"
GROUP_LABEL = "ray.io/group"
NODE_TYPE_LABEL = "ray.io/node-type"
TIER_LABEL = "app.kubernetes.io/component"

def merge_patch(live: dict, desired: dict) -> dict:
    """The JSON merge patch (RFC 7386) that turns `live` into `desired`: changed or new keys carry
    the desired value, keys missing from `desired` become null (deleted), nested objects recurse,
    lists are replaced whole. Empty when nothing differs."""
    patch: dict = {}
    for key, value in desired.items():
        if key not in live:
            patch[key] = value
        elif isinstance(value, dict) and isinstance(live[key], dict):
            nested = merge_patch(live[key], value)
            if nested:
                patch[key] = nested
        elif live[key] != value:
            patch[key] = value
    for key in live:
        if key not in desired:
            patch[key] = None
    return patch


@dataclass(frozen=True)
class ApplyResult:
    action: str  # "created", "patched" or "unchanged"
    name: str
    namespace: str
    body: dict | None  # what was sent (the object on create, the merge patch on patch)


def apply_rayservice(api: CustomObjectsApi, desired: dict, namespace: str, *, dry_run: bool = False) -> ApplyResult:
    """Create the RayService if it does not exist, else merge-patch it to `desired`.

    The patch replaces `spec` (fields gone from the rendered object are deleted) and sets the
    chart's labels and annotations without touching metadata others own. It carries the live
    `resourceVersion`, so a concurrent change makes the server answer 409 instead of losing it.
    """
    if desired.get("apiVersion") != f"{RAY_GROUP}/{RAY_VERSION}" or desired.get("kind") != "RayService":
        raise ValueError(
            f"expected a {RAY_GROUP}/{RAY_VERSION} RayService, got {desired.get('apiVersion')}/{desired.get('kind')}"
        )
    name = desired.get("metadata", {}).get("name")
    if not name:
        raise ValueError("the RayService has no metadata.name")
    desired = {**desired, "metadata": {**desired["metadata"], "namespace": namespace}}
    dry = "All" if dry_run else None
    try:
        live = api.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAYSERVICE_PLURAL, name)
    except ApiException as error:
        if error.status != 404:
            raise
        api.create_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, RAYSERVICE_PLURAL, desired, dry_run=dry, field_manager=FIELD_MANAGER
        )
        return ApplyResult("created", name, namespace, desired)

    live_meta = live.get("metadata", {})
    metadata_patch: dict = {}
    for key in ("labels", "annotations"):
        wanted = desired["metadata"].get(key) or {}
        changed = {k: v for k, v in wanted.items() if (live_meta.get(key) or {}).get(k) != v}
        if changed:
            metadata_patch[key] = changed
    spec_patch = merge_patch(live.get("spec") or {}, desired.get("spec") or {})
    if not metadata_patch and not spec_patch:
        return ApplyResult("unchanged", name, namespace, None)
    body: dict = {"metadata": {**metadata_patch, "resourceVersion": live_meta.get("resourceVersion")}}
    if spec_patch:
        body["spec"] = spec_patch
    api.patch_namespaced_custom_object(
        RAY_GROUP, RAY_VERSION, namespace, RAYSERVICE_PLURAL, name, body,
        dry_run=dry, field_manager=FIELD_MANAGER, _content_type=MERGE_PATCH,
    )
    return ApplyResult("patched", name, namespace, body)
