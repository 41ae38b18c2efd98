"""The speccascade Serve application: `build_app(args)` is the import path
`speccascade.app:build_app` used by the Serve configs in deploy/ and the Helm chart.

    Router (ingress: gRPC and HTTP; the loop; no model) ──► Drafter (N replicas)
                                                        └──► Expert  (M replicas)

The router deployment is `ingress.Ingress`: the serving core (`speccascade.serving.router`) with
both protocol front-ends on it.

gRPC: Serve's proxy hosts the services listed in `GRPC_SERVICER_FUNCTIONS` and routes each RPC
to the ingress method of the same name. That includes `grpc.health.v1.Health`: its `Check` and
`Watch` are answered by the router, so health reflects the application (router up, expert tier
with a running replica) rather than only the proxy process. Server reflection is built into the
proxy (`gRPCOptions.enable_reflection`, on by default) and lists every registered service.
The SpecCascade service registers through `frontends.grpc.proxy.add_SpecCascadeServicer_to_server`,
which also keeps the proxy's log of hung-up clients to one line each.

HTTP: the same router deployment is also the application's HTTP ingress. `serve.ingress()` with no
app wraps it so that Serve's HTTP proxy hands requests to the ASGI app the ingress builds on each
replica (the OpenAI-compatible API of `frontends.openai`), while the gRPC proxy keeps calling the
RPC methods by name. One deployment, one loop, both protocols.

`launcher.LocalStack` starts all of it on this machine (`speccascade serve`, benchmarks, tests).
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.config import RequestRouterConfig

from ..config.app import AppConfig, Replicas, RouterConfig, TierConfig
from ..serving.affinity import SessionAffinityRouter
from ..serving.cpu_turns import cpu_spin_env
from ..serving.heap import allocator_env, kernel_cache_env
from ..serving.tiers import DrafterTier, ExpertTier
from ..serving.wire import GRPC_MESSAGE_ENV
from .ingress import Ingress

APP_NAME = "speccascade"
DEFAULT_GRPC_PORT = 9000
GRPC_SERVICER_FUNCTIONS = [
    "speccascade.frontends.grpc.proxy.add_SpecCascadeServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
DRAFTER_DEPLOYMENT, EXPERT_DEPLOYMENT, ROUTER_DEPLOYMENT = "Drafter", "Expert", "Router"


def replica_options(replicas: Replicas) -> dict:
    if replicas.min_replicas == replicas.max_replicas:
        return {"num_replicas": replicas.min_replicas}
    autoscaling = {"min_replicas": replicas.min_replicas, "max_replicas": replicas.max_replicas}
    if replicas.initial_replicas is not None:
        autoscaling["initial_replicas"] = replicas.initial_replicas
    return {"autoscaling_config": autoscaling}


# Every Serve process flushes the request metrics it caches every 100 ms by default: its event loop
# and the GIL woken ten times a second, beside the forward passes of a tier on the same cores (on two
# shared cores, Serve's periodic work slowed a 0.5B decode step by 10-13 %; BENCHMARKS.md, "Serve's
# own work beside the passes"). Prometheus scrapes every several seconds: once a second is enough.
SERVE_METRICS_ENV = {"RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}


def tier_actor_options(tier: TierConfig) -> dict:
    """Ray actor options of a tier's replicas: its placement, and the environment its process
    starts with: the configured C allocator (preloaded), the bound on compiled CPU kernels, how
    long its idle OpenMP threads spin, and how often Serve flushes its metrics."""
    options = tier.placement.ray_actor_options()
    options["runtime_env"] = {"env_vars": allocator_env(tier.allocator) | kernel_cache_env(tier.cpu_kernel_cache)
                              | cpu_spin_env(tier.cpu_spin_count) | GRPC_MESSAGE_ENV | SERVE_METRICS_ENV}
    return options


def router_actor_options(router: RouterConfig) -> dict:
    """Ray actor options of the router's replicas: its placement, and the environment its process
    starts with: the configured C allocator, Serve's gRPC message bound (the tiers' answers may
    carry whole probability rows) and how often Serve flushes its metrics."""
    return {**router.placement.ray_actor_options(),
            "runtime_env": {"env_vars": allocator_env(router.allocator) | GRPC_MESSAGE_ENV | SERVE_METRICS_ENV}}


# Serve waits for the calls it routed to a stopping tier replica (every this many seconds) before
# the replica's own drain (`ModelTier.drain`) starts; the margin covers that wait.
TIER_SHUTDOWN_WAIT_LOOP_S = 0.5
TIER_SHUTDOWN_MARGIN_S = 5.0


def served_tier(cls):
    """The tier class as Serve runs it: Serve's shutdown hook, `__del__`, drains the replica
    (`ModelTier.drain`). Serve calls it on the replica's event loop and awaits the coroutine it
    returns; the interpreter calls it again when it collects the object, outside any loop, where it
    must not make a coroutine that nobody awaits (nor does a plain tier, which has no hook)."""

    def __del__(self):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None
        return self.drain()

    return type(cls.__name__, (cls,), {"__del__": __del__, "__module__": cls.__module__,
                                       "__doc__": cls.__doc__})


def tier_deployment(cls, name: str, tier: TierConfig):
    return serve.deployment(
        served_tier(cls), name=name, ray_actor_options=tier_actor_options(tier),
        max_ongoing_requests=tier.max_ongoing_requests,
        request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),
        # Stopping: Serve's own calls, then the tier's sessions (drain_timeout_s), then it ends.
        graceful_shutdown_timeout_s=tier.drain_timeout_s + TIER_SHUTDOWN_MARGIN_S,
        graceful_shutdown_wait_loop_s=TIER_SHUTDOWN_WAIT_LOOP_S,
        **replica_options(tier.replicas),
    )


def build_app(args: dict | AppConfig | None = None) -> serve.Application:
    """Validate `args` into an `AppConfig` (errors name the bad value) and wire the deployments."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    direct = config.router.tier_transport == "direct"  # the tiers open their direct channel
    drafter = tier_deployment(DrafterTier, DRAFTER_DEPLOYMENT, config.drafter).bind(config.drafter, direct=direct)
    expert = tier_deployment(ExpertTier, EXPERT_DEPLOYMENT, config.expert).bind(config.expert, direct=direct)
    router = serve.deployment(
        serve.ingress()(Ingress), name=ROUTER_DEPLOYMENT, ray_actor_options=router_actor_options(config.router),
        max_ongoing_requests=config.router.max_ongoing_requests, **replica_options(config.router.replicas),
        # Draining: a stopping replica gets no new requests; its streams have this long to finish.
        graceful_shutdown_timeout_s=config.router.drain_timeout_s,
        graceful_shutdown_wait_loop_s=min(1.0, max(config.router.drain_timeout_s, 0.1)),
    )
    return router.bind(drafter, expert, config)
