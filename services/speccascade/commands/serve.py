"""`speccascade serve`: start a local Ray cluster and the speccascade application with its gRPC
port and its OpenAI-compatible HTTP API open, print how to call both, and run until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
from dataclasses import dataclass
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
               "applications": [{"name": APP_NAME, "route_prefix": "/",
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


@dataclass(frozen=True)
class Endpoints:
    app_name: str
    grpc_target: str
    openai_base_url: str  # the OpenAI clients' base_url


def start(schema, args: argparse.Namespace, *, app_args: dict) -> Endpoints:
    """Start Ray, Serve's proxies and the application."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from ..tiers.app import build_app
    from ..tiers.config import AppConfig

    (app,) = schema.applications
    config = AppConfig.model_validate(app_args)  # fail fast, naming the bad value
    grpc_port = args.grpc_port or schema.grpc_options.port
    http_host, http_port = schema.http_options.host, args.http_port or schema.http_options.port
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=args.verbose)
    serve.start(
        http_options=HTTPOptions(host=http_host, port=http_port),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=schema.grpc_options.grpc_servicer_functions),
    )
    serve.run(build_app(config), name=app.name, route_prefix=app.route_prefix)
    client_host = "localhost" if http_host in ("0.0.0.0", "::") else http_host
    prefix = (app.route_prefix or "/").rstrip("/")
    return Endpoints(app.name, f"localhost:{grpc_port}", f"http://{client_host}:{http_port}{prefix}/v1")


def usage(endpoints: Endpoints) -> str:
    """How to call the running service: gRPC (CLI, grpcurl) and the OpenAI API (Python, curl)."""
    from ..tiers.openai_api import SERVED_MODEL

    target, base_url = endpoints.grpc_target, endpoints.openai_base_url
    return f"""call it over gRPC:
  speccascade client --target {target} 'Write a Python function that reverses a string.'
  grpcurl -plaintext {target} list
  grpcurl -plaintext {target} grpc.health.v1.Health/Check
  grpcurl -plaintext -d '{{"prompt": "def fib(n):", "max_new_tokens": 32}}' {target} speccascade.v1.SpecCascade/Generate

or with an OpenAI client (model "{SERVED_MODEL}"; the cascade policy goes in extra_body):
  from openai import OpenAI
  client = OpenAI(base_url="{base_url}", api_key="unused")  # a tenant's key where tenants are set up
  stream = client.chat.completions.create(
      model="{SERVED_MODEL}", messages=[{{"role": "user", "content": "Reverse a string in Python."}}],
      max_tokens=64, stream=True, extra_body={{"rule": "chow", "alpha": 0.3}})
  for chunk in stream:
      if chunk.choices:
          print(chunk.choices[0].delta.content or "", end="", flush=True)

  curl {base_url}/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{SERVED_MODEL}", "messages": [{{"role": "user", "content": "def fib(n):"}}], "rule": "token", "alpha": 0.5}}'
"""


def start_from_config(config: Path | None, *, drafter: str | None, expert: str | None, dtype: str | None,
                      backend: str | None = None, device: str | None = None, grpc_port: int | None = None,
                      http_port: int | None = None) -> Endpoints:
    """What the benchmarks run against: the application of a Serve config (the local one by default)
    with the given models and settings, started here as `serve` would."""
    schema = load_serve_config(config)
    (app,) = schema.applications
    serve_args = argparse.Namespace(drafter=drafter, expert=expert, dtype=dtype, backend=backend, device=device,
                                    grpc_port=grpc_port, http_port=http_port, num_cpus=None, verbose=False)
    return start(schema, serve_args, app_args=app_args_with_overrides(app.args, serve_args))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    schema = load_serve_config(args.config)
    (app,) = schema.applications
    app_args = app_args_with_overrides(app.args, args)
    with console.status("starting Ray and the speccascade application (loading both tiers)..."):
        endpoints = start(schema, args, app_args=app_args)
    # soft_wrap: commands and code are printed whole, to be copied, however narrow the terminal.
    console.print(f"[bold green]speccascade is serving[/] gRPC on [bold]{endpoints.grpc_target}[/] and the "
                  f"OpenAI API on [bold]{endpoints.openai_base_url}[/] (application {endpoints.app_name!r})\n",
                  soft_wrap=True)
    tenants_file = (app_args.get("tenancy") or {}).get("tenants_file")
    if tenants_file:
        console.print(f"tenants from {tenants_file}: every call needs a key (--api-key or SPECCASCADE_API_KEY; "
                      "the OpenAI client's api_key)\n", soft_wrap=True)
    else:
        console.print("[yellow]no tenants file: the service answers anyone who reaches it[/] "
                      "(speccascade serve --tenants FILE)\n", soft_wrap=True)
    console.print(usage(endpoints), markup=False, soft_wrap=True)
    console.print("Ctrl-C to stop.")
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
    parser = subparsers.add_parser("serve", help="serve the cascade over gRPC and the OpenAI API on a local Ray cluster")
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
