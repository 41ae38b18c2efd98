"""Faults: a replica killed mid-request, a tier with no replica that can be placed."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import openai
import pytest
import ray
from ray import serve
from speccascade.api.client import SpecCascadeClient
from speccascade.engine.request import GenerationRequest
from speccascade.serving.replicas import replica_actor_names

from ..served import PROMPT, SERVE_APP, app_args, in_process_policy, wait_for_running


@pytest.mark.parametrize("rule,alpha,sampling", [
    ("lossless", 0.0, {}),
    ("token", 0.3, dict(temperature=0.7, top_p=0.95)),
], ids=["greedy-lossless", "sampled-token"])
def test_replica_killed_mid_request_still_gives_the_in_process_output(client, local_engine, tier_handles, rule,
                                                                      alpha, sampling):
    options = dict(seed=9, max_new_tokens=200, block_size=1)
    expected = in_process_policy(local_engine, "cascade", rule, alpha, sampling, **options)
    if rule == "lossless" and not sampling:  # lossless greedy is the expert's own greedy output
        assert expected.token_ids == in_process_policy(local_engine, "expert", rule, alpha, sampling, **options).token_ids
    call = client.stream(prompt=PROMPT, rule=rule, alpha=alpha, **options, **sampling)
    chunks = [next(call)]
    (victim,) = replica_actor_names(SERVE_APP, "Expert")
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    chunks += list(call)
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert replica_actor_names(SERVE_APP, "Expert") != [victim]  # Serve replaced the replica...
    # ...and the replacement finished the request by recomputing the session from scratch (a call
    # in flight at the kill is retried by the router, one not yet routed by Serve's handle).
    assert tier_handles["Expert"].cache_stats.remote().result().misses >= 1


@pytest.fixture
def app_with_unplaceable_tier(grpc_port, tiny_pair, request):
    """An application whose `request.param` tier needs a Ray resource no node has, so it never gets
    a running replica (a node group with no nodes). Yields its gRPC client; its HTTP routes are
    under `/<application name>`."""
    from speccascade.app import build_app

    missing_tier = request.param
    name = f"speccascade-no-{missing_tier}"
    args = app_args(*tiny_pair, router={"tier_call_timeout_s": 2.0, "tier_call_attempts": 1},
                    **{missing_tier: {"placement": {"resources": {f"{missing_tier}_tier": 1}}}})
    # serve.run waits for every deployment to be healthy; this one never is by construction.
    serve._run(build_app(args), name=name, route_prefix=f"/{name}", _blocking=False)
    present = {"drafter": "Expert", "expert": "Drafter"}[missing_tier]
    wait_for_running(name, ["Router", present])
    try:
        with SpecCascadeClient(f"127.0.0.1:{grpc_port}", application=name) as app_client:
            yield app_client
    finally:
        serve.delete(name)


@pytest.mark.parametrize("app_with_unplaceable_tier", ["expert"], indirect=True)
def test_expert_tier_without_replicas_is_unavailable(app_with_unplaceable_tier, http_port):
    for call in (lambda: app_with_unplaceable_tier.generate(prompt=PROMPT, max_new_tokens=8),
                 lambda: list(app_with_unplaceable_tier.stream(prompt=PROMPT, max_new_tokens=8))):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "expert tier has no healthy replica" in error.value.details()
    assert app_with_unplaceable_tier.health() == "NOT_SERVING"

    # The same over the OpenAI API: a 503 with an OpenAI error object, streamed or not.
    base_url = f"http://127.0.0.1:{http_port}/speccascade-no-expert"
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60) as oai:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as error:
                oai.completions.create(model="speccascade", prompt=PROMPT, max_tokens=8, stream=stream)
            assert error.value.status_code == 503
            assert error.value.body["code"] == "tier_unavailable"
            assert "expert tier has no healthy replica" in error.value.body["message"]
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{base_url}/health", timeout=30)
    assert error.value.code == 503


@pytest.mark.parametrize("app_with_unplaceable_tier", ["drafter"], indirect=True)
def test_drafter_tier_without_replicas_degrades_to_expert_only(app_with_unplaceable_tier, local_engine):
    response = app_with_unplaceable_tier.generate(prompt=PROMPT, rule="lossless", max_new_tokens=16)
    expected = local_engine.generate(GenerationRequest(prompt=PROMPT, method="expert", max_new_tokens=16))
    assert list(response.token_ids) == expected.token_ids
    assert response.stats.expert_only_fallback
    assert response.stats.tokens_from_drafter == 0 and response.stats.drafted == 0
    assert app_with_unplaceable_tier.health() == "SERVING"


def test_a_tier_replica_says_whether_its_model_is_moving(client, tier_handles):
    """What the router asks a replica when a call outlives its timeout (`TierClient` decides on it:
    tests/serving/test_clients.py)."""
    client.generate(prompt=PROMPT, max_new_tokens=8)
    progress = tier_handles["Expert"].options(multiplexed_model_id="probe").progress.remote().result()
    assert (progress.queued, progress.running) == (0, False)
    assert progress.moving(60.0) and not progress.moving(0.0)  # its last pass ended moments ago
