"""`speccascade health`: ask a running server whether the application serves, optionally waiting
until it does. Exits 0 when it serves, 1 otherwise: a readiness check for scripts and the chart's
`helm test` pod.

Over gRPC (`--target`), the grpc.health.v1 service answers SERVING when the expert tier has a
running replica. Over the OpenAI-compatible HTTP API (`--openai-url`, the base URL ending in
`/v1`), the model list must answer 200 with the application's model, with the tenant's API key
when the service has tenants: what an OpenAI client sees first."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

RETRY_PERIOD_S = 2.0


def grpc_status(args: argparse.Namespace) -> str:
    import grpc

    from ..api.client import SpecCascadeClient

    with SpecCascadeClient(args.target, application=args.application) as client:
        try:
            return client.health(timeout=args.timeout)
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"


def openai_status(args: argparse.Namespace) -> str:
    """SERVING when `<url>/models` lists a model; otherwise what went wrong, as the server said it."""
    from ..api.client import API_KEY_ENV

    request = urllib.request.Request(f"{args.openai_url.rstrip('/')}/models")
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            models = [model["id"] for model in json.load(response).get("data", [])]
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")
        try:
            body = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        return f"HTTP {error.code}: {body}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        return f"no answer: {error}"
    return "SERVING" if models else "the model list is empty"


def run(args: argparse.Namespace) -> int:
    where, check = (f"{args.openai_url.rstrip('/')}/models", openai_status) if args.openai_url else \
        (args.target, grpc_status)
    deadline = time.monotonic() + args.wait
    while True:
        status = check(args)
        if status == "SERVING" or time.monotonic() + RETRY_PERIOD_S > deadline:
            break
        time.sleep(RETRY_PERIOD_S)
    print(f"{where}: {status}", file=sys.stdout if status == "SERVING" else sys.stderr)
    return 0 if status == "SERVING" else 1


def register(subparsers) -> None:
    parser = subparsers.add_parser("health", help="check that a running speccascade server is SERVING")
    parser.add_argument("--target", default="localhost:9000", help="gRPC server address (default: localhost:9000)")
    parser.add_argument("--application", help="Serve application name, when the cluster runs several (gRPC)")
    parser.add_argument("--openai-url", metavar="URL",
                        help="check the OpenAI-compatible API at this base URL (…/v1) instead of gRPC: its model "
                             "list must answer with a model")
    parser.add_argument("--api-key", help="a tenant's API key for --openai-url (default: $SPECCASCADE_API_KEY)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep asking for up to this long until the server is SERVING (default: ask once)")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds of each check")
    parser.set_defaults(handler=run)
