"""Cancelled requests over the served app: no cache outlives its request, a call that a release
overtook is refused, a router that dies leaves nothing behind for long, and every client
cancellation or expired deadline is logged as one line, without a traceback."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import pytest
import ray
from ray import serve
from speccascade.api.client import SpecCascadeClient
from speccascade.engine.blocks import DraftPayload, SampleRows
from speccascade.options import SamplingParams
from speccascade.serving.replicas import replica_actor_names, wait_until_running
from speccascade.serving.wire import DraftCall, SentTokens

from ..served import PROMPT, SERVE_APP, app_args, cached_sessions, wait_until

ROUTER_LINE = "cancelled by the client"
PROXY_LINE = "client went away mid-stream"
CLIENT_GONE_TRACEBACKS = ("RequestCancelledError", "GeneratorExit")  # what Serve's proxy printed before


def all_logs(ray_cluster: str, *, serve_only: bool = False) -> dict[Path, str]:
    """The cluster's log files; `serve_only`: Serve's own files (each Serve line is also echoed
    to its process's stderr file)."""
    logs = Path(ray_cluster) / "session_latest" / "logs"
    paths = (logs / "serve").glob("*.log") if serve_only else (p for p in logs.rglob("*") if p.suffix in (".log", ".err"))
    return {path: path.read_text(errors="replace") for path in paths}


def lines_with(logs: dict[Path, str], needle: str) -> list[str]:
    return [line for text in logs.values() for line in text.splitlines() if needle in line]


def test_cancels_and_deadlines_leave_no_cache_and_one_log_line_each(client, tier_handles, ray_cluster):
    ids = [f"cancel-{uuid.uuid4().hex[:12]}" for _ in range(10)]
    for i, request_id in enumerate(ids):  # cancelled mid-stream, at different moments
        call = client.stream(prompt=PROMPT, max_new_tokens=300, seed=i, block_size=2, request_id=request_id)
        for _ in range(1 + i % 3):
            next(call)
        time.sleep(0.02 * (i % 4))
        call.cancel()
    deadline_ids = [f"deadline-{uuid.uuid4().hex[:12]}" for _ in range(3)]
    for i, request_id in enumerate(deadline_ids):  # deadlines that pass mid-generation
        # One token a round at most: the tiny pair served 300 tokens of γ = 4 in under a second.
        with pytest.raises(grpc.RpcError) as error:
            client.generate(prompt=PROMPT, max_new_tokens=400, block_size=1, seed=i, request_id=request_id,
                            timeout=0.5)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    router = tier_handles["Router"]
    assert wait_until(lambda: router.active_session_count.remote().result() == 0
                      and cached_sessions(tier_handles) == {"Drafter": 0, "Expert": 0}, timeout=60), (
        f"left behind: {cached_sessions(tier_handles)}, router active {router.active_session_count.remote().result()}")

    def lines_per_request() -> dict[str, int]:
        logs = all_logs(ray_cluster, serve_only=True)
        said = lines_with(logs, ROUTER_LINE) + lines_with(logs, PROXY_LINE)
        return {request_id: sum(request_id in line for line in said) for request_id in ids + deadline_ids}

    assert wait_until(lambda: set(lines_per_request().values()) == {1}, timeout=15), lines_per_request()
    logs = all_logs(ray_cluster)
    for needle in CLIENT_GONE_TRACEBACKS:
        assert not lines_with(logs, needle), needle
    assert all("Generate cancelled" in line for r in deadline_ids for line in lines_with(logs, r)
               if ROUTER_LINE in line)


def test_a_call_the_release_overtook_is_refused_by_the_served_tier(served):
    drafter = serve.get_deployment_handle("Drafter", app_name=SERVE_APP)
    session = uuid.uuid4().hex
    on_its_replica = drafter.options(multiplexed_model_id=session)
    before = on_its_replica.cache_stats.remote().result()
    assert on_its_replica.release.remote(session).result() is False  # arrived before any call
    late = on_its_replica.draft.remote(DraftCall(session, SentTokens().delta(list(range(3, 20))), 3, SamplingParams(),
                                                 0, DraftPayload(SampleRows.NONE)))
    with pytest.raises(ray.exceptions.RayError):  # the replica ended it as cancelled (how that reaches a
        late.result()                             # caller depends on Serve's transport)
    after = on_its_replica.cache_stats.remote().result()
    assert after.late_calls == before.late_calls + 1
    assert after.sessions == before.sessions and after.misses == before.misses  # nothing was cached


APP_ROUTER_DIES = "speccascade-router-dies"
IDLE_TIMEOUT_S = 2.0


@pytest.fixture
def app_with_short_idle_timeout(grpc_port, tiny_pair):
    from speccascade.app import build_app

    tier = {"session_idle_timeout_s": IDLE_TIMEOUT_S}
    serve.run(build_app(app_args(*tiny_pair, drafter=tier, expert=tier)), name=APP_ROUTER_DIES,
              route_prefix=f"/{APP_ROUTER_DIES}")
    try:
        yield f"127.0.0.1:{grpc_port}"
    finally:
        serve.delete(APP_ROUTER_DIES)


def test_sessions_of_a_router_that_died_mid_request_are_reclaimed(app_with_short_idle_timeout):
    handles = {name: serve.get_deployment_handle(name, app_name=APP_ROUTER_DIES) for name in ("Drafter", "Expert")}
    with SpecCascadeClient(app_with_short_idle_timeout, application=APP_ROUTER_DIES) as client:
        # Not resumed (resume_attempts=0): the request ends with its router, as a client that gives up.
        call = client.stream(prompt=PROMPT, max_new_tokens=400, block_size=1, resume_attempts=0)
        next(call)
        (router,) = replica_actor_names(APP_ROUTER_DIES, "Router")
        ray.kill(ray.get_actor(router, namespace="serve"), no_restart=True)  # it never releases its session
        with pytest.raises(grpc.RpcError):
            list(call)

    def stats():
        return {name: handle.cache_stats.remote().result() for name, handle in handles.items()}

    # The router's last calls built the session; nothing else will touch it: the idle sweep frees it.
    assert wait_until(lambda: all(s.sessions == 0 and s.reclaimed >= 1 for s in stats().values()),
                      timeout=IDLE_TIMEOUT_S * 10), stats()
    wait_until_running(APP_ROUTER_DIES, ["Router"], timeout_s=120)
