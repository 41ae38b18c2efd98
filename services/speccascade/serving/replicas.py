"""A running application's tier replicas, one by one: which exist, and each one's process and cache
statistics (soak tests, operators). Needs a Ray connection to the cluster (`ray.init(address=...)`).

Replicas are found by their Ray actor names, `SERVE_REPLICA::<app>#<deployment>#<replica id>`
(Serve's naming, as `ray list actors` shows them); calls reach a given replica through the session
affinity router's replica pin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .affinity import pinned_to

if TYPE_CHECKING:
    from .heap import ProcessStats
    from .tiers import ReplicaStats

SERVE_NAMESPACE = "serve"
RUNNING = "RUNNING"


def state_name(state) -> str:
    """A state from `serve.status()` as its name: Serve gives enums or plain strings, by field."""
    return str(getattr(state, "value", state))


def running_count(replica_states: dict) -> int:
    """Replicas in the RUNNING state, from a deployment's `replica_states`."""
    return sum(n for state, n in replica_states.items() if state_name(state) == RUNNING)


def replica_actor_prefix(app: str, deployment: str) -> str:
    return f"SERVE_REPLICA::{app}#{deployment}#"


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Names of the deployment's live replica actors (namespace `serve`)."""
    import ray

    prefix = replica_actor_prefix(app, deployment)
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def replica_ids(app: str, deployment: str) -> list[str]:
    prefix = replica_actor_prefix(app, deployment)
    return [name.removeprefix(prefix) for name in replica_actor_names(app, deployment)]


def tier_replica_stats(app: str, deployment: str, *, timeout_s: float = 30.0) -> list[ReplicaStats]:
    """`ReplicaStats` of every live replica of a tier deployment, each asked directly. A replica
    that does not answer in time (busy starting, or just killed) is left out."""
    from ray import serve
    from ray.exceptions import RayError

    handle = serve.get_deployment_handle(deployment, app_name=app)
    responses = [handle.options(multiplexed_model_id=pinned_to(replica)).replica_stats.remote()
                 for replica in replica_ids(app, deployment)]
    stats: dict[str, ReplicaStats] = {}
    for response in responses:
        try:
            answer = response.result(timeout_s=timeout_s)
        except TimeoutError:
            response.cancel()
            continue
        except RayError:  # the replica died between listing and answering
            continue
        stats[answer.process.replica_id] = answer  # a pin to a replica gone meanwhile may land on another
    return sorted(stats.values(), key=lambda s: s.process.replica_id)


def router_process_stats(app: str, deployment: str = "Router", *, timeout_s: float = 30.0,
                         calls_per_replica: int = 4) -> list[ProcessStats]:
    """`ProcessStats` of the router replicas that answered. The router deployment takes Serve's own
    load-balancing (no replica pins), so it is asked up to `calls_per_replica` times per live replica
    until every one has answered (Serve picks which replica answers each call: one can be missed)."""
    from ray import serve
    from ray.exceptions import RayError

    live = set(replica_ids(app, deployment))
    handle = serve.get_deployment_handle(deployment, app_name=app)
    stats: dict[str, ProcessStats] = {}
    for _ in range(calls_per_replica * len(live)):
        response = handle.process_stats.remote()
        try:
            answer = response.result(timeout_s=timeout_s)
        except TimeoutError:
            response.cancel()
            break
        except RayError:
            continue
        stats[answer.replica_id] = answer
        if live <= stats.keys():
            break
    return sorted(stats.values(), key=lambda s: s.replica_id)


def wait_until_running(app: str, deployments: list[str], *, timeout_s: float = 120.0, period_s: float = 0.5) -> None:
    """Block until the application is RUNNING with every deployment's replicas all running."""
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app)
        if status is not None and state_name(status.status) == RUNNING and all(
            d in status.deployments and _all_running(status.deployments[d].replica_states) for d in deployments
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"deployments {deployments} of application {app!r} not all running after {timeout_s:g}s")
        time.sleep(period_s)


def _all_running(replica_states: dict) -> bool:
    states = {state_name(state) for state, n in replica_states.items() if n}
    return states == {RUNNING}
