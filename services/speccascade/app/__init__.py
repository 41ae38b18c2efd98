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


def tier_actor_options(tier: TierConfig) -> dict:
    """Ray actor options of a tier's replicas: its placement, and the environment its process
    starts with: the configured C allocator (preloaded), the bound on compiled CPU kernels and how
    long its idle OpenMP threads spin."""
    options = tier.placement.ray_actor_options()
    options["runtime_env"] = {"env_vars": allocator_env(tier.allocator) | kernel_cache_env(tier.cpu_kernel_cache)
                              | cpu_spin_env(tier.cpu_spin_count) | GRPC_MESSAGE_ENV}
    return options


def router_actor_options(router: RouterConfig) -> dict:
    """Ray actor options of the router's replicas: its placement, and the environment its process
    starts with: the configured C allocator and Serve's gRPC message bound (the tiers' answers may
    carry whole probability rows)."""
    return {**router.placement.ray_actor_options(),
            "runtime_env": {"env_vars": allocator_env(router.allocator) | GRPC_MESSAGE_ENV}}


def tier_deployment(cls, name: str, tier: TierConfig):
    return serve.deployment(
        cls, name=name, ray_actor_options=tier_actor_options(tier),
        max_ongoing_requests=tier.max_ongoing_requests,
        request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),
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
