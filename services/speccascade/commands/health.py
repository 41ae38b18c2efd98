"""`speccascade health`: ask a running server's grpc.health.v1 service whether the application
serves (the expert tier has a running replica), optionally waiting until it does. Exits 0 when
SERVING, 1 otherwise: a readiness check for scripts and the chart's `helm test` pod."""

from __future__ import annotations

import argparse
import sys
import time

RETRY_PERIOD_S = 2.0


def run(args: argparse.Namespace) -> int:
    import grpc

    from ..api.client import SpecCascadeClient

    deadline = time.monotonic() + args.wait
    with SpecCascadeClient(args.target, application=args.application) as client:
        while True:
            try:
                status = client.health(timeout=args.timeout)
            except grpc.RpcError as error:
                status = f"{error.code().name}: {error.details()}"
            if status == "SERVING" or time.monotonic() + RETRY_PERIOD_S > deadline:
                break
            time.sleep(RETRY_PERIOD_S)
    print(f"{args.target}: {status}", file=sys.stdout if status == "SERVING" else sys.stderr)
    return 0 if status == "SERVING" else 1


def register(subparsers) -> None:
    parser = subparsers.add_parser("health", help="check that a running speccascade server is SERVING")
    parser.add_argument("--target", default="localhost:9000", help="server address (default: localhost:9000)")
    parser.add_argument("--application", help="Serve application name, when the cluster runs several")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep asking for up to this long until the server is SERVING (default: ask once)")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds of each check")
    parser.set_defaults(handler=run)
