"""A local serving stack, started and stopped in one place: a Ray cluster on this machine, Serve's
gRPC and HTTP proxies, and speccascade applications deployed on them. `speccascade serve`, every
benchmark that serves, and the tests all start the service through `LocalStack`, so they run it
the same way.

    with LocalStack(grpc_port=9000, http_port=8000) as stack:
        endpoints = stack.deploy(AppConfig.model_validate(args))
        ...  # call endpoints.grpc_target or endpoints.openai_base_url

A Serve config file (`deploy/local-cpu.yaml` by default) gives the ports and the application's
`args`; `ServeOverrides` are what the command line changes in it.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..config import AppConfig
from . import APP_NAME, DEFAULT_GRPC_PORT, GRPC_SERVICER_FUNCTIONS, SERVE_METRICS_ENV, build_app

LOCAL_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "local-cpu.yaml"
DEFAULT_HTTP_PORT = 8000

# On one machine, Serve's controller and proxy share the cores with the tiers' passes. The
# controller's loop runs every 0.1 s by default (with its calls to the GCS, ~3 % of a core while
# nothing is served); once a second is enough for deploying, health and autoscaling, whose delays
# are seconds. With the metrics flushed once a second in every Serve process (`SERVE_METRICS_ENV`),
# an idle stack beside a 0.5B decode step on two shared cores slowed it by 4-8 % instead of 10-13 %
# (BENCHMARKS.md, "Serve's own work beside the passes"). A value set in the environment stands for
# the controller and the proxies; the replicas' own runtime environment sets their flush regardless.
LOCAL_SERVE_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1"} | SERVE_METRICS_ENV


EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_CHOSEN_PORT = 10000


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections and port-0 binds (Linux's default where it
    cannot be read)."""
    try:
        low, high = EPHEMERAL_PORTS.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(rng: random.Random | None = None) -> int:
    """A TCP port nothing listens on right now, below the kernel's ephemeral range.

    A port the kernel hands out for a port-0 bind is one it may hand out again at once: between
    this call and the proxy binding it, one of Ray's own sockets (a worker's connection, a gRPC
    server on port 0) can take it, and Serve fails with "Failed to bind to address". Ports below
    the ephemeral range are only ever taken by an explicit bind."""
    rng = rng or random.SystemRandom()
    low, high = ephemeral_port_range()
    # Below the range; above it where a machine's range starts too low to leave room.
    bottom, top = (LOWEST_CHOSEN_PORT, low) if low - LOWEST_CHOSEN_PORT >= 1000 else (high + 1, 65536)
    for _ in range(200):
        port = rng.randrange(bottom, top)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
            return port
    raise RuntimeError(f"no free TCP port found in {bottom}-{top - 1} after 200 tries")


@dataclass(frozen=True)
class Endpoints:
    """Where a deployed application answers."""

    app_name: str
    grpc_target: str  # host:port of the gRPC proxy (the application is chosen by gRPC metadata)
    openai_base_url: str  # the OpenAI clients' base_url


TIER_PROCESS_OPTIONS = ("allocator", "cpu_kernel_cache", "cpu_spin_count")  # how both tiers' processes run


@dataclass(frozen=True)
class ServeOverrides:
    """What the command line changes in a Serve config's application: both tiers' models and
    execution settings, the tenants file, a fixed number of router replicas, and how the router
    reaches the tiers."""

    drafter: str | None = None
    expert: str | None = None
    dtype: str | None = None
    backend: str | None = None
    device: str | None = None
    allocator: str | None = None
    cpu_kernel_cache: int | None = None
    cpu_spin_count: int | None = None
    tenants_file: Path | None = None
    tier_settings: dict[str, dict] = field(default_factory=dict)  # "drafter"/"expert" -> fields to set
    router_replicas: int | None = None
    tier_transport: str | None = None  # RouterConfig.tier_transport

    def apply(self, app_args: dict | None) -> dict:
        out = {key: dict(value) if isinstance(value, dict) else value for key, value in (app_args or {}).items()}
        for tier in ("drafter", "expert"):
            tier_args = out.setdefault(tier, {})
            if getattr(self, tier):
                tier_args["model"] = getattr(self, tier)
            for option in ("dtype", "backend", "device", *TIER_PROCESS_OPTIONS):
                if getattr(self, option) is not None:
                    tier_args[option] = getattr(self, option)
            tier_args.update(self.tier_settings.get(tier, {}))
        if self.router_replicas is not None:
            out["router"] = {**out.get("router", {}), "replicas": {"min_replicas": self.router_replicas,
                                                                   "max_replicas": self.router_replicas}}
        if self.tier_transport is not None:
            out["router"] = {**out.get("router", {}), "tier_transport": self.tier_transport}
        if self.tenants_file:
            out["tenancy"] = {**out.get("tenancy", {}), "tenants_file": str(Path(self.tenants_file).resolve())}
        return out


def load_serve_config(path: Path | None = None):
    """A Serve config (deploy/local-cpu.yaml by default) as a validated `ServeDeploySchema`."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    if path is None and LOCAL_CONFIG.exists():
        path = LOCAL_CONFIG
    if path is None:  # an installed package without the repository's deploy/ directory
        raw = {"grpc_options": {"port": DEFAULT_GRPC_PORT, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
               "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "speccascade.app:build_app",
                                 "args": {}}]}
    else:
        raw = yaml.safe_load(Path(path).read_text())
    return ServeDeploySchema.model_validate(raw)


@contextmanager
def _sigterm_handler_kept():
    """Keep this process's own SIGTERM handler through the block: `ray.init` installs a failure
    handler of its own (absl's) over it, which prints a stack trace and kills the process, so a
    command that meant to stop cleanly on SIGTERM (`timeout`, a job runner: keep what was measured,
    stop the cluster) would die on the spot instead. A Python handler is put back; signal handlers
    are set from the main thread only."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    try:
        yield
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


@contextmanager
def _environment(defaults: dict[str, str]):
    """`defaults` in this process's environment where it does not set them, until the block ends: the
    processes a local Ray cluster starts (its GCS, raylet and every worker) inherit it. A job-level
    runtime environment would reach the workers only, and makes Ray start idle workers of its own."""
    added = {name: value for name, value in defaults.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


# How long `serve.shutdown()` waits for Serve's controller to stop every replica gracefully before it
# gives up (Ray's own limit, not configurable through its public API); the cluster's stop then ends
# what is left. A local stack's drain is therefore at most this long, whatever drain_timeout_s says.
SERVE_SHUTDOWN_WAIT_S = 30.0


class LocalStack:
    """A Ray cluster started in this process, Serve's proxies on the given ports, and applications.

    `num_cpus`: the cluster's CPUs (default: the machine's). `worker_threads`: OMP_NUM_THREADS of
    every Ray worker (tiny models on a shared machine gain nothing from threads); None leaves Ray's
    default (a replica's num_cpus). `log_to_driver`: replicas' logs on this process's stderr."""

    def __init__(self, *, grpc_port: int = DEFAULT_GRPC_PORT, http_port: int = DEFAULT_HTTP_PORT,
                 http_host: str = "127.0.0.1", num_cpus: int | None = None, worker_threads: int | None = None,
                 log_to_driver: bool = False, temp_dir: str | None = None):
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.http_host = http_host
        self.num_cpus = num_cpus
        self.worker_threads = worker_threads
        self.log_to_driver = log_to_driver
        self.temp_dir = temp_dir
        self.started = False
        self._started_cluster = False  # ray.init ran here (a cluster `stop_now` may stop)
        self._cluster_lock = threading.Lock()

    @classmethod
    def from_serve_config(cls, schema, *, grpc_port: int | None = None, http_port: int | None = None,
                          **options) -> "LocalStack":
        """The stack a Serve config describes (its proxies' ports and host), with ports overridden."""
        return cls(grpc_port=grpc_port or schema.grpc_options.port, http_port=http_port or schema.http_options.port,
                   http_host=schema.http_options.host, **options)

    def start(self) -> "LocalStack":
        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions, gRPCOptions

        options = dict(address="local", num_cpus=self.num_cpus, include_dashboard=False,
                       log_to_driver=self.log_to_driver)
        if self.temp_dir:
            options["_temp_dir"] = self.temp_dir
        if self.worker_threads:
            options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(self.worker_threads)}}
        # The cluster's processes start with the environment; this one keeps its own, and its SIGTERM handler.
        with _environment(LOCAL_SERVE_ENV), _sigterm_handler_kept():
            ray.init(**options)
        self.started = self._started_cluster = True
        try:
            serve.start(http_options=HTTPOptions(host=self.http_host, port=self.http_port),
                        grpc_options=gRPCOptions(port=self.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
        except BaseException:
            self.stop()
            raise
        return self

    def deploy(self, config: AppConfig | dict, *, name: str = APP_NAME, route_prefix: str = "/") -> Endpoints:
        """Deploy (or update) an application and return once every deployment runs. The
        configuration is validated first (a ValueError names the bad value)."""
        from ray import serve

        config = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
        serve.run(build_app(config), name=name, route_prefix=route_prefix)
        return self.endpoints(name, route_prefix)

    def endpoints(self, name: str = APP_NAME, route_prefix: str = "/") -> Endpoints:
        host = "localhost" if self.http_host in ("0.0.0.0", "::") else self.http_host
        prefix = (route_prefix or "/").rstrip("/")
        return Endpoints(name, f"localhost:{self.grpc_port}", f"http://{host}:{self.http_port}{prefix}/v1")

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)

    def stop(self) -> None:
        """Shut down Serve gracefully (routers' streams and tiers' sessions drain), then the Ray
        cluster (idempotent). Another thread can cut the drain short with `stop_now`."""
        from ray import serve

        with self._cluster_lock:
            if not self.started:  # stopped, or stopped at once meanwhile (`stop_now`)
                return
            self.started = False
        try:
            serve.shutdown()
        finally:
            self.stop_now()

    def stop_now(self) -> None:
        """Stop the Ray cluster at once, every replica with it (idempotent; callable from another
        thread while `stop` waits on Serve's drain, whose wait then ends with Ray's SystemExit).
        Also stops a cluster this process connected to after the first `stop_now` (Serve's shutdown,
        finding Ray gone, starts one to look for its controller)."""
        import ray

        with self._cluster_lock:
            self.started = False
            if self._started_cluster and ray.is_initialized():
                ray.shutdown()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class Launched:
    """A running local stack with one application: stop it with `stack.stop()`."""

    stack: LocalStack
    endpoints: Endpoints
    config: AppConfig


def start_serve_config(path: Path | None, overrides: ServeOverrides = ServeOverrides(), *,
                       grpc_port: int | None = None, http_port: int | None = None,
                       stop_with: ExitStack | None = None, **stack_options) -> Launched:
    """Start a local stack with the application of a Serve config (the local one by default),
    changed by `overrides`, as `speccascade serve` does. A bad configuration fails before Ray
    starts, naming the bad value. With `stop_with`, the stack stops when that closes, as soon as
    the cluster runs (also when the deployment fails or is interrupted: the caller decides what
    comes before the stop, e.g. writing what it measured); otherwise a failed deployment stops it
    here."""
    schema = load_serve_config(path)
    (app,) = schema.applications
    config = AppConfig.model_validate(overrides.apply(app.args))
    stack = LocalStack.from_serve_config(schema, grpc_port=grpc_port, http_port=http_port, **stack_options).start()
    if stop_with is not None:
        stop_with.callback(stack.stop)
    try:
        return Launched(stack, stack.deploy(config, name=app.name, route_prefix=app.route_prefix), config)
    except BaseException:
        if stop_with is None:
            stack.stop()
        raise
