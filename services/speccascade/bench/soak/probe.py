"""What the soak samples of the service through Ray (each tier replica's memory and cache
sessions, each router replica's memory, the router's active sessions) and how it kills replicas."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ...serving.heap import ProcessStats

TIERS = ("Drafter", "Expert")
ROUTER = "Router"
MEMORY_DEPLOYMENTS = (ROUTER, *TIERS)  # whose replicas' resident memory the soak follows
STATS_TIMEOUT_S = 10.0  # a replica that does not answer a sample in time (it is starting) is left out


@dataclass
class ReplicaSample:
    replica_id: str
    pid: int
    rss_bytes: int
    sessions: int
    cache_bytes: int
    released: int
    reclaimed: int
    late_calls: int


@dataclass
class Sample:
    t_s: float
    phase: str  # load | settled (clients stopped --settle-s ago)
    ok: int
    failed: int
    cancelled: int
    deadline: int
    latency_p50_s: float | None  # of requests completed since the previous sample
    latency_p95_s: float | None
    ttft_p50_s: float | None
    router_active_sessions: int | None
    tiers: dict[str, list[ReplicaSample]]
    routers: list[ProcessStats] = field(default_factory=list)  # absent from soak files written before 2026-12-05

    def memory(self, deployment: str) -> list[ProcessStats | ReplicaSample]:
        """The deployment's replicas that answered this sample (each with `replica_id`, `rss_bytes`)."""
        return self.routers if deployment == ROUTER else self.tiers.get(deployment, [])

    def sessions(self, tier: str) -> int | None:
        """Cache sessions over the tier's replicas; None if no replica answered (all restarting)."""
        replicas = self.tiers.get(tier, [])
        return sum(r.sessions for r in replicas) if replicas else None


@dataclass
class KillEvent:
    t_s: float
    deployment: str
    replica_id: str


class ServiceProbe:
    """Reads the service's replicas (memory, sessions) and kills them, through Ray."""

    def __init__(self, app: str):
        self.app = app

    def tiers(self) -> dict[str, list[ReplicaSample]]:
        from ...serving.replicas import tier_replica_stats

        return {tier: [ReplicaSample(s.process.replica_id, s.process.pid, s.process.rss_bytes, s.cache.sessions, s.cache.nbytes,
                                     s.cache.released, s.cache.reclaimed, s.cache.late_calls)
                       for s in tier_replica_stats(self.app, tier, timeout_s=STATS_TIMEOUT_S)]
                for tier in TIERS}

    def routers(self) -> list[ProcessStats]:
        from ...serving.replicas import router_process_stats

        return router_process_stats(self.app, ROUTER, timeout_s=STATS_TIMEOUT_S)

    def router_active_sessions(self) -> int | None:
        from ray import serve
        from ray.exceptions import RayError

        try:
            return serve.get_deployment_handle(ROUTER, app_name=self.app).active_session_count.remote().result(
                timeout_s=30)
        except (TimeoutError, RayError):
            return None

    def kill_one(self, deployment: str, rng: random.Random) -> str:
        import ray

        from ...serving.replicas import SERVE_NAMESPACE, replica_actor_names, replica_actor_prefix

        names = replica_actor_names(self.app, deployment)
        if not names:
            raise RuntimeError(f"no live {deployment} replica of application {self.app!r} to kill")
        victim = rng.choice(names)
        ray.kill(ray.get_actor(victim, namespace=SERVE_NAMESPACE), no_restart=True)
        return victim.removeprefix(replica_actor_prefix(self.app, deployment))

    def wait_until_running(self, timeout_s: float) -> None:
        from ...serving.replicas import wait_until_running

        wait_until_running(self.app, [ROUTER, *TIERS], timeout_s=timeout_s)
