"""The router deployment: the serving core with both protocol front-ends on it.

Serve's gRPC proxy calls the ingress's methods by the RPC's name (`GrpcFrontend`: Generate,
GenerateStream, Check, Watch); Serve's HTTP proxy hands requests to the ASGI app built on each
replica (`__serve_build_asgi_app__`: the OpenAI-compatible API). Both adapt requests into the same
`RouterCore` calls, so one deployment runs one loop for both protocols. Operations calls (the
autoscaling window and stats, active sessions) are the core's.
"""

from __future__ import annotations

import logging

from ..config import AppConfig
from ..frontends.grpc.servicer import GrpcFrontend
from ..serving.heap import ProcessStats, describe_allocator, prepare_allocator, replica_process_stats
from ..serving.logs import log_to_replica_file
from ..serving.router import RouterCore

log = logging.getLogger(__name__)


class Ingress(GrpcFrontend):
    async def __init__(self, drafter, expert, config: AppConfig):
        """Serve awaits an async constructor on the replica's event loop, and counts the replica
        ready only once it returns: after the quota ledger answers."""
        log_to_replica_file()
        self.allocator = prepare_allocator(config.router.allocator, field="router.allocator")
        log.info("router replica on the %s", describe_allocator(config.router.allocator, self.allocator))
        self.core = RouterCore(drafter, expert, config)
        self.core.start()
        await self.core.connect()

    def __del__(self):
        """Serve's hook at replica shutdown: stop the core's background tasks."""
        core = getattr(self, "core", None)  # a constructor that failed leaves none
        if core is not None:
            core.close()

    def __serve_build_asgi_app__(self):
        """Serve's hook for an ingress deployment built with `serve.ingress()`: the
        OpenAI-compatible HTTP API over this replica's core, built once the core exists."""
        from ..frontends.openai.api_router import build_http_app

        return build_http_app(self.core)

    # ---- operations (Ray Serve's hooks and handle calls) ----

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook for custom autoscaling metrics: the router's counters since it
        started (cumulative; `speccascade.autoscale.policy` turns them into rates)."""
        return self.core.autoscaling_stats()

    async def take_window(self) -> dict[str, float]:
        """The raw counters since the previous call (for autoscaling), and restart the window."""
        return self.core.take_window()

    async def active_session_count(self) -> int:
        return len(self.core.active_sessions)

    async def process_stats(self) -> ProcessStats:
        """This replica's process: replica and process ids, resident memory, C allocator."""
        return replica_process_stats(self.allocator)
