"""`speccascade serve`: start a local Ray cluster and the speccascade application with its gRPC
port open, print how to call it, and run until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

LOCAL_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "local-cpu.yaml"


def add_execution_arguments(parser: argparse.ArgumentParser, *, overrides_config: bool) -> None:
    """--backend and --device, for every command that runs the models (for `serve` they override
    the Serve config's values for both tiers)."""
    from ..engine.backends import BACKEND_KINDS

    suffix = "; overrides the config for both tiers" if overrides_config else ""
    parser.add_argument("--backend", choices=BACKEND_KINDS, default=None if overrides_config else "hf",
                        help="model execution: hf (transformers, dynamic caches) or static (preallocated slots, "
                             "CUDA graphs on GPUs)" + suffix)
    parser.add_argument("--device", default=None if overrides_config else "auto",
                        help="auto (CUDA when present), cpu, cuda or cuda:N" + suffix)


def load_serve_config(path: Path | None):
    """The Serve config (deploy/local-cpu.yaml by default) as a validated ServeDeploySchema."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from ..tiers.app import APP_NAME, DEFAULT_GRPC_PORT, GRPC_SERVICER_FUNCTIONS

    if path is None and LOCAL_CONFIG.exists():
        path = LOCAL_CONFIG
    if path is None:  # an installed package without the repository's deploy/ directory
        raw = {"grpc_options": {"port": DEFAULT_GRPC_PORT, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
               "applications": [{"name": APP_NAME, "route_prefix": "/speccascade",
                                 "import_path": "speccascade.tiers.app:build_app", "args": {}}]}
    else:
        raw = yaml.safe_load(Path(path).read_text())
    return ServeDeploySchema.model_validate(raw)


def app_args_with_overrides(args_dict: dict, args: argparse.Namespace) -> dict:
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in (args_dict or {}).items()}
    for tier in ("drafter", "expert"):
        tier_args = out.setdefault(tier, {})
        if getattr(args, tier):
            tier_args["model"] = getattr(args, tier)
        for option in ("dtype", "backend", "device"):
            if getattr(args, option, None):
                tier_args[option] = getattr(args, option)
    if getattr(args, "tenants", None):
        out["tenancy"] = {**out.get("tenancy", {}), "tenants_file": str(Path(args.tenants).resolve())}
    return out


def start(schema, args: argparse.Namespace, *, app_args: dict) -> tuple[int, str]:
    """Start Ray, Serve's proxies and the application; returns (gRPC port, application name)."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from ..tiers.app import build_app
    from ..tiers.config import AppConfig

    (app,) = schema.applications
    config = AppConfig.model_validate(app_args)  # fail fast, naming the bad value
    grpc_port = args.grpc_port or schema.grpc_options.port
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=args.verbose)
    serve.start(
        http_options=HTTPOptions(host=schema.http_options.host, port=args.http_port or schema.http_options.port),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=schema.grpc_options.grpc_servicer_functions),
    )
    serve.run(build_app(config), name=app.name, route_prefix=app.route_prefix)
    return grpc_port, app.name


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    schema = load_serve_config(args.config)
    (app,) = schema.applications
    app_args = app_args_with_overrides(app.args, args)
    with console.status("starting Ray and the speccascade application (loading both tiers)..."):
        grpc_port, app_name = start(schema, args, app_args=app_args)
    target = f"localhost:{grpc_port}"
    console.print(f"[bold green]speccascade is serving[/] gRPC on [bold]{target}[/] (application {app_name!r})\n")
    tenants_file = (app_args.get("tenancy") or {}).get("tenants_file")
    if tenants_file:
        console.print(f"tenants from {tenants_file}: every call needs a key (--api-key or SPECCASCADE_API_KEY)\n")
    else:
        console.print("[yellow]no tenants file: the service answers anyone who reaches it[/] "
                      "(speccascade serve --tenants FILE)\n")
    console.print("call it with:")
    console.print(f"  speccascade client --target {target} 'Write a Python function that reverses a string.'")
    console.print(f"  grpcurl -plaintext {target} list")
    console.print(f"  grpcurl -plaintext {target} grpc.health.v1.Health/Check")
    console.print(f"  grpcurl -plaintext -d '{{\"prompt\": \"def fib(n):\", \"max_new_tokens\": 32}}' "
                  f"{target} speccascade.v1.SpecCascade/Generate")
    console.print("\nCtrl-C to stop.")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        while not stop.wait(timeout=1.0):
            pass
    finally:
        shutdown(console)
    return 0


def shutdown(console) -> None:
    import ray
    from ray import serve

    console.print("\nshutting down...")
    serve.shutdown()
    ray.shutdown()
    console.print("stopped.")


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve the cascade over gRPC on a local Ray cluster")
    parser.add_argument("--config", type=Path, help=f"Serve config (default: {LOCAL_CONFIG.name} values)")
    parser.add_argument("--drafter", help="override the drafter model source")
    parser.add_argument("--expert", help="override the expert model source")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="override both tiers' dtype")
    add_execution_arguments(parser, overrides_config=True)
    parser.add_argument("--tenants", type=Path, help="tenants file: every call then needs a tenant's API key "
                                                     "(`speccascade tenants add` writes it; reloaded when it changes)")
    parser.add_argument("--grpc-port", type=int, help="override the gRPC port (default from the config: 9000)")
    parser.add_argument("--http-port", type=int, help="override the HTTP port")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    parser.set_defaults(handler=run)
