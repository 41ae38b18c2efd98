"""Session affinity with several replicas: a session's calls all land on one replica's cache."""

from __future__ import annotations

import pytest
from ray import serve
from speccascade.api.client import SpecCascadeClient
from speccascade.serving.replicas import tier_replica_stats

from ..served import app_args, wait_for_running

APP = "speccascade-two-experts"


@pytest.fixture(scope="module")
def two_expert_app(grpc_port, tiny_pair):
    from speccascade.app import build_app

    args = app_args(*tiny_pair, expert={"replicas": {"min_replicas": 2, "max_replicas": 2}})
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    wait_for_running(APP, ["Router", "Drafter", "Expert"])
    try:
        yield f"127.0.0.1:{grpc_port}"
    finally:
        serve.delete(APP)


def expert_caches() -> dict[str, object]:
    """Cache stats of every Expert replica, each asked through a replica pin."""
    return {stats.process.replica_id: stats.cache for stats in tier_replica_stats(APP, "Expert")}


def test_each_session_is_computed_on_one_replica_only(two_expert_app):
    before = expert_caches()
    assert len(before) == 2
    sessions = 6
    with SpecCascadeClient(two_expert_app, application=APP) as client:
        for i in range(sessions):
            response = client.generate(prompt=f"def f{i}(x):", rule="lossless", block_size=2, max_new_tokens=24)
            assert response.stats.expert_passes >= 8
    after = expert_caches()
    new_sessions = {r: after[r].misses - before[r].misses for r in after}
    # Every verify call of a session found its cache: one miss per session in total. Without
    # affinity, calls would alternate between the replicas and each switch would recompute.
    assert sum(new_sessions.values()) == sessions


def test_the_routing_index_forgets_sessions_whose_calls_were_all_routed():
    """Serve drops an entry of its index by multiplexed id only when the same id comes again; a
    session's id never does once it ends, so the router drops the routed ones itself."""
    import asyncio
    from types import SimpleNamespace

    from speccascade.serving.affinity import forget_routed

    loop = asyncio.new_event_loop()
    try:
        def pending(done: bool):
            future = loop.create_future()
            if done:
                future.set_result("replica")
            return SimpleNamespace(future=future)

        index = {"ended": [pending(True), pending(True)], "waiting": [pending(True), pending(False)],
                 "new": [pending(False)]}
        assert forget_routed(index) == 1
        assert set(index) == {"waiting", "new"}
    finally:
        loop.close()
