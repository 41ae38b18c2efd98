"""Generate the Helm chart's helm/speccascade/values.schema.json (never edit it by hand; rerun this).

    python scripts/gen_chart_schema.py           # regenerate
    python scripts/gen_chart_schema.py --check   # exit 1 if the committed schema is out of date

The `app` block is the Serve application's `args`: its schema is pydantic's JSON Schema of
`speccascade.config.app.AppConfig` (every model under `$defs`, with its descriptions and
constraints), so the chart accepts exactly AppConfig's fields and `helm lint` / `helm install`
refuse a wrong one with a message naming it. The deferral-aware autoscaling policy's kwargs are
checked against `speccascade.autoscale.settings.AutoscalingSettings` the same way. The chart-only
values (worker groups, pods, image, services, metrics, network policy, autoscaler, dashboard, helm
test) are described below; their descriptions are the `# --` comments of values.yaml. Rules that
span several fields (min_replicas <= max_replicas, static.slots >= max_batch_size, ...) are beyond
JSON Schema: AppConfig checks them when Serve builds the app.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHART_DIR = REPO / "helm" / "speccascade"
SCHEMA_PATH = CHART_DIR / "values.schema.json"
VALUES_PATH = CHART_DIR / "values.yaml"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Pasted into the `ray start` command line (rayStartParams.resources), so no quotes or spaces.
RAY_RESOURCE_NAME = r"^[A-Za-z0-9_.-]+$"


# ------------------------------------------------------------------------------ schema helpers

def closed(properties: dict) -> dict:
    """An object with exactly these keys (a misspelt value is an error, not silently ignored)."""
    return {"type": "object", "additionalProperties": False, "properties": properties}


def mapping(values: dict | None = None) -> dict:
    """A free-form map, e.g. a Kubernetes object passed through with toYaml."""
    return {"type": "object"} if values is None else {"type": "object", "additionalProperties": values}


def integer(minimum: int, maximum: int | None = None, *, nullable: bool = False) -> dict:
    schema: dict = {"type": ["integer", "null"] if nullable else "integer", "minimum": minimum}
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def string() -> dict:
    return {"type": "string"}


def strings() -> dict:
    """A map of strings (labels, annotations, node selectors)."""
    return mapping(string())


def boolean() -> dict:
    return {"type": "boolean"}


def port() -> dict:
    return integer(1, 65535)


def objects() -> dict:
    """A list of Kubernetes objects passed through with toYaml (env, volumes, tolerations, ...)."""
    return {"type": "array", "items": {"type": "object"}}


def pod_group() -> dict:
    """What every Ray group (head and workers) sets on its pods: one pod template renders them."""
    return {
        "resources": mapping(),
        "rayStartParams": mapping({"type": ["string", "number", "boolean"]}),
        "nodeSelector": strings(),
        "tolerations": objects(),
        "affinity": mapping(),
        "podLabels": strings(),
        "podAnnotations": strings(),
        "env": objects(),
        "volumes": objects(),
        "volumeMounts": objects(),
    }


def tier() -> dict:
    return closed({
        "rayResource": closed({
            "name": {"type": "string", "pattern": RAY_RESOURCE_NAME},
            # The Ray autoscaler reads custom resources as integers.
            "perReplica": integer(1),
        }),
        "workerGroup": closed({
            "groupName": {"type": "string", "pattern": DNS_LABEL},
            "replicasPerPod": integer(1),
            "minReplicas": integer(0),
            "maxReplicas": integer(0),
            "replicas": integer(0, nullable=True),
            "idleTimeoutSeconds": integer(0, nullable=True),
            **pod_group(),
        }),
    })


def chart_values_schema(deferral_policy_function: str) -> dict:
    """The values besides `app`: what the chart itself renders (and the autoscaling pieces it
    carries, whose kwargs are the settings of the policy at `deferral_policy_function`)."""
    return closed({
        "nameOverride": string(),
        "fullnameOverride": string(),
        "image": closed({
            "repository": {"type": "string", "minLength": 1},
            "tag": {"type": ["string", "number"]},
            "flavour": {"enum": ["cpu", "cuda"]},  # the images `make image` builds (docker/<flavour>.Dockerfile)
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        }),
        "imagePullSecrets": objects(),
        "rayVersion": {"type": "string", "minLength": 1},
        "gpuResourceName": {"type": "string", "minLength": 1},
        "serviceAccountName": string(),
        "commonLabels": strings(),
        "env": objects(),
        "rayService": closed({
            "deploymentUnhealthySecondThreshold": integer(0, nullable=True),
            "upgradeStrategy": mapping(),
            "annotations": strings(),
        }),
        "serve": closed({
            "applicationName": {"type": "string", "minLength": 1},
            "importPath": {"type": "string", "pattern": r"^[\w.]+:[\w.]+$"},
            "httpPort": port(),
            "grpcPort": port(),
            "grpcServicerFunctions": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "grpcRequestTimeoutS": {"type": ["number", "null"], "exclusiveMinimum": 0},
            "proxyLocation": {"enum": ["EveryNode", "HeadOnly", "Disabled"]},
            "runtimeEnv": mapping(),
        }),
        "app": {"$ref": "#/$defs/AppConfig"},
        "autoscaling": closed({
            # The deferral-aware policy's kwargs are an AutoscalingSettings document.
            "autoscalingPolicy": {
                "type": "object",
                "if": {"properties": {"policy_function": {"const": deferral_policy_function}},
                       "required": ["policy_function"]},
                "then": {"properties": {"policy_kwargs": {"$ref": "#/$defs/AutoscalingSettings"}}},
            },
            # Entries are checked by the chart itself, with messages that name the entry.
            "deployments": {"type": "array"},
        }),
        "rayAutoscaler": closed({
            "enabled": boolean(),
            "idleTimeoutSeconds": integer(0),
            "upscalingMode": {"enum": ["Default", "Conservative", "Aggressive"]},
            "resources": mapping(),
        }),
        "tenantAuth": closed({
            "existingSecret": string(),
            "secretKey": {"type": "string", "minLength": 1},
            "mountPath": {"type": "string", "pattern": "^/"},
            "required": {"type": "boolean"},
        }),
        "resumeKey": closed({
            "existingSecret": string(),
            "secretKey": {"type": "string", "minLength": 1},
            "mountPath": {"type": "string", "pattern": "^/"},
        }),
        "head": closed(pod_group()),
        "tiers": closed({"drafter": tier(), "expert": tier()}),
        "sharedMemorySize": {"type": ["string", "integer"]},
        "service": closed({
            "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
            "grpcPort": port(),
            "annotations": strings(),
        }),
        "ingress": closed({
            "enabled": boolean(),
            "className": string(),
            "annotations": strings(),
            "host": string(),
            "tls": objects(),
        }),
        "httpIngress": closed({
            "enabled": boolean(),
            "className": string(),
            "annotations": strings(),
            "host": string(),
            "paths": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^/"}},
            "tls": objects(),
        }),
        "metrics": closed({
            "port": port(),
            "podAnnotations": boolean(),
            "serviceMonitor": closed({"enabled": boolean(), "interval": string(), "labels": strings()}),
        }),
        "networkPolicy": closed({
            "enabled": boolean(),
            "clients": objects(),  # NetworkPolicy `from` peers, passed through with toYaml
            "metrics": objects(),
            "operator": objects(),
        }),
        "grafana": closed({
            "dashboard": closed({
                "enabled": boolean(),
                "label": {"type": "string", "minLength": 1},
                "labelValue": string(),
                "namespace": string(),
                "annotations": strings(),
            }),
        }),
        "tests": closed({
            "enabled": boolean(),
            "waitSeconds": integer(0),
            "timeoutSeconds": integer(1),
            "prompt": {"type": "string", "minLength": 1},
            "maxNewTokens": integer(1),
            "apiKeySecret": closed({"name": string(), "key": {"type": "string", "minLength": 1}}),
            "resources": mapping(),
        }),
        # Helm hands a parent chart's `global` values to its subcharts.
        "global": mapping(),
    })


# -------------------------------------------------------------------- descriptions from values.yaml

_KEY = re.compile(r"^(\s*)([\w./-]+):(.*)$")


def value_docs(text: str) -> dict[tuple[str, ...], str]:
    """The `# --` comment above each value of values.yaml (with its continuation lines), by path."""
    docs: dict[tuple[str, ...], str] = {}
    lines = text.splitlines()
    stack: list[tuple[int, str]] = []
    for index, line in enumerate(lines):
        match = _KEY.match(line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, name))
        comments: list[str] = []
        for previous in reversed(lines[:index]):
            if not previous.strip().startswith("#"):
                break
            comments.insert(0, previous.strip())
        starts = [i for i, comment in enumerate(comments) if comment.startswith("# --")]
        if starts:
            block = comments[starts[-1]:]
            text_lines = [block[0].removeprefix("# --").strip()] + [c.removeprefix("#").strip() for c in block[1:]]
            docs[tuple(key for _, key in stack)] = " ".join(t for t in text_lines if t)
    return docs


def describe(schema: dict, docs: dict[tuple[str, ...], str], path: tuple[str, ...] = ()) -> None:
    for key, sub in schema.get("properties", {}).items():
        if (path + (key,)) in docs and "$ref" not in sub:
            sub["description"] = docs[path + (key,)]
        describe(sub, docs, path + (key,))


# ------------------------------------------------------------------------------------ the schema

def generate() -> str:
    from speccascade.autoscale.settings import DEFERRAL_POLICY_FUNCTION, AutoscalingSettings
    from speccascade.config.app import AppConfig

    models: dict[str, dict] = {}
    for model in (AppConfig, AutoscalingSettings):
        schema = model.model_json_schema()
        for name, definition in {**schema.pop("$defs"), model.__name__: schema}.items():
            if models.setdefault(name, definition) != definition:
                raise SystemExit(f"two different models are named {name}; their schemas would collide")
    schema = chart_values_schema(DEFERRAL_POLICY_FUNCTION)
    describe(schema, value_docs(VALUES_PATH.read_text()))
    schema["properties"]["app"]["description"] = (
        "The Serve application's args (speccascade.config.app.AppConfig), under its own field names. "
        "The chart adds each tier's tiers.<tier>.rayResource to its placement.resources.")
    document = {
        "title": "speccascade Helm chart values",
        "description": "Generated by scripts/gen_chart_schema.py from speccascade.config.app.AppConfig, "
                       "speccascade.autoscale.settings.AutoscalingSettings and the chart's own values; "
                       "do not edit.",
        **schema,
        "$defs": dict(sorted(models.items())),
    }
    return json.dumps(document, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed schema is up to date")
    args = parser.parse_args(argv)
    content = generate()
    current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
    if args.check:
        if current != content:
            diff = difflib.unified_diff(current.splitlines(), content.splitlines(), lineterm="", n=1)
            print(f"{SCHEMA_PATH.relative_to(REPO)} is out of date; run python scripts/gen_chart_schema.py",
                  file=sys.stderr)
            print("\n".join(list(diff)[:40]), file=sys.stderr)
            return 1
        return 0
    if current != content:
        SCHEMA_PATH.write_text(content)
        print(f"wrote {SCHEMA_PATH.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "services"))
    raise SystemExit(main())
