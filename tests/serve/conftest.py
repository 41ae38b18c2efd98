"""A local Ray cluster (one per test session) serving the application on tiny random models
saved to disk, the way a user points the tiers at model directories."""

from __future__ import annotations

import socket
import tempfile

import pytest

SERVE_APP = "speccascade"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_pair(tiny_model_dirs):
    """(drafter dir, expert dir): the engine tests' tiny fp32 pair plus the shared tokenizer."""
    return tiny_model_dirs


def app_args(drafter_dir: str, expert_dir: str, **overrides) -> dict:
    tier = {"dtype": "fp32", "kv_cache_budget_mb": 64, "batch_wait_timeout_s": 0.002}
    args = {
        "drafter": {"model": drafter_dir, **tier},
        "expert": {"model": expert_dir, **tier},
        "router": {"tier_call_timeout_s": 60.0},  # generous: a replica restart on a loaded machine
        "policy": {"rule": "lossless", "alpha": 0.0, "block_size": 4, "max_new_tokens": 32,
                   "max_new_tokens_cap": 400},
    }
    for key, value in overrides.items():
        args[key] = {**args.get(key, {}), **value}
    return args


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's local Ray cluster; yields its temp directory (logs under session_latest/logs)."""
    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="ray-sc-serve-", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}, log_to_driver=False)
    try:
        yield temp_dir
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def proxy_ports(ray_cluster) -> dict[str, int]:
    """Serve's proxies on free ports: {"grpc": port, "http": port}."""
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from speccascade.tiers.app import GRPC_SERVICER_FUNCTIONS

    ports = {"grpc": free_port(), "http": free_port()}
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=ports["http"]),
                grpc_options=gRPCOptions(port=ports["grpc"], grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
    return ports


@pytest.fixture(scope="session")
def grpc_port(proxy_ports) -> int:
    return proxy_ports["grpc"]


@pytest.fixture(scope="session")
def http_port(proxy_ports) -> int:
    return proxy_ports["http"]


@pytest.fixture(scope="session")
def served(grpc_port, tiny_pair):
    """The application on the tiny pair at route prefix "/"; returns the gRPC target."""
    from ray import serve

    from speccascade.tiers.app import build_app

    serve.run(build_app(app_args(*tiny_pair)), name=SERVE_APP, route_prefix="/")
    return f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="session")
def openai_base_url(served, http_port) -> str:
    """Base URL of the served application's OpenAI-compatible API."""
    return f"http://127.0.0.1:{http_port}/v1"


@pytest.fixture
def client(served):
    from speccascade.api.client import SpecCascadeClient

    with SpecCascadeClient(served, application=SERVE_APP) as c:
        yield c


@pytest.fixture
def tier_handles(served):
    from ray import serve

    return {name: serve.get_deployment_handle(name, app_name=SERVE_APP) for name in ("Drafter", "Expert", "Router")}
