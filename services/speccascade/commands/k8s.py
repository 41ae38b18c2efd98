"""`speccascade k8s status|apply`: read or apply the KubeRay RayService of a Helm release with the
Kubernetes API (kubeconfig, or the in-cluster service account)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_RELEASE = "speccascade"


def register(subparsers) -> None:
    parser = subparsers.add_parser("k8s", help="the RayService on Kubernetes: status, apply")
    actions = parser.add_subparsers(dest="k8s_action", required=True, metavar="ACTION")

    status = actions.add_parser("status", help="RayService status, each tier's worker pods, the Serve app's health")
    _add_connection_arguments(status)
    status.add_argument("--name", default=DEFAULT_RELEASE,
                        help=f"RayService name (the chart's fullname; default {DEFAULT_RELEASE})")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=_status)

    apply = actions.add_parser("apply", help="render the chart (helm template) and create or patch its RayService")
    _add_connection_arguments(apply)
    apply.add_argument("--release", default=DEFAULT_RELEASE, help=f"Helm release name (default {DEFAULT_RELEASE})")
    apply.add_argument("--chart", type=Path, help="chart directory (default: helm/speccascade of this source tree)")
    apply.add_argument("-f", "--values", type=Path, action="append", default=[], help="values file (repeatable)")
    apply.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE",
                       help="value override in helm --set syntax (repeatable)")
    apply.add_argument("--set-json", dest="set_json_values", action="append", default=[], metavar="KEY=JSON",
                       help="value override in helm --set-json syntax, e.g. app.policy.alpha=0.3 (repeatable; "
                            "--set reads 0.3 as a string)")
    apply.add_argument("--dry-run", action="store_true", help="server-side dry run: validate, persist nothing")
    apply.add_argument("--show", action="store_true", help="print the request body sent")
    apply.set_defaults(handler=_apply)


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", default="default", help="Kubernetes namespace (default: default)")
    parser.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")


def _api_client(args: argparse.Namespace):
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    try:
        config.load_kube_config(
            config_file=str(args.kubeconfig) if args.kubeconfig else None,
            context=args.context, client_configuration=configuration,
        )
    except (ConfigException, FileNotFoundError) as kube_error:
        if args.kubeconfig or args.context:
            raise ValueError(f"cannot load kubeconfig {args.kubeconfig or ''} context {args.context or ''}: {kube_error}")
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException:
            raise ValueError(f"no Kubernetes credentials: {kube_error} (and not running in a cluster)") from None
    return client.ApiClient(configuration)


def _status(args: argparse.Namespace) -> int:
    from kubernetes.client import CoreV1Api, CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    from ..k8s import format_status, read_status
    from ..k8s.status import status_json

    with _api_client(args) as api_client:
        try:
            status = read_status(CustomObjectsApi(api_client), CoreV1Api(api_client), args.namespace, args.name)
        except ApiException as error:
            if error.status == 404:
                raise ValueError(f"no RayService {args.name!r} in namespace {args.namespace!r}") from None
            raise ValueError(f"Kubernetes API error {error.status} {error.reason}: {error.body}") from None
    print(status_json(status) if args.json else format_status(status))
    return 0 if status.healthy else 1


def _apply(args: argparse.Namespace) -> int:
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    from ..k8s import HelmError, apply_rayservice, check_app_args, render_chart, select_kind

    try:
        objects = render_chart(release=args.release, namespace=args.namespace, chart_dir=args.chart,
                               values_files=args.values, set_values=args.set_values,
                               set_json_values=args.set_json_values)
    except HelmError as error:
        raise ValueError(str(error)) from None
    services = select_kind(objects, "RayService", "ray.io/v1")
    if len(services) != 1:
        raise ValueError(f"the chart rendered {len(services)} ray.io/v1 RayService objects, expected 1")
    check_app_args(services[0])  # what the Serve controller would refuse after the cluster is up
    others = sorted({obj["kind"] for obj in objects} - {"RayService"})
    with _api_client(args) as api_client:
        try:
            result = apply_rayservice(CustomObjectsApi(api_client), services[0], args.namespace, dry_run=args.dry_run)
        except ApiException as error:
            hint = " (changed concurrently: run apply again)" if error.status == 409 else ""
            raise ValueError(f"Kubernetes API error {error.status} {error.reason}{hint}: {error.body}") from None
    suffix = " (dry run)" if args.dry_run else ""
    print(f"rayservice {result.namespace}/{result.name} {result.action}{suffix}")
    if args.show and result.body is not None:
        json.dump(result.body, sys.stdout, indent=2, sort_keys=True)
        print()
    if others:
        print(f"note: the chart also renders {', '.join(others)}; `helm upgrade --install` manages those")
    return 0
