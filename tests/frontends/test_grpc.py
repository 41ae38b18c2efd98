"""The served application through real gRPC on a local Ray cluster (tiny fp32 models)."""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2
from speccascade.api.client import build_request
from speccascade.api.v1 import speccascade_pb2 as pb
from speccascade.engine.request import GenerationRequest
from speccascade.frontends.grpc.convert import PROTO_BY_METHOD, PROTO_BY_SOURCE
from speccascade.options import Method

from ..served import POLICIES, PROMPT, SAMPLINGS, SERVE_APP, cached_sessions, in_process, in_process_policy, wait_until


@pytest.mark.parametrize("gamma", [1, 4])
def test_served_lossless_greedy_equals_in_process_expert_greedy(client, local_engine, gamma):
    response = client.generate(prompt=PROMPT, rule="lossless", block_size=gamma, max_new_tokens=40)
    expected = in_process(local_engine, max_new_tokens=40)
    assert list(response.token_ids) == expected.token_ids
    assert response.text == expected.text
    assert response.stats.accepted > 0 and response.stats.expert_passes < 40  # the drafter really helped
    assert response.finish_reason == pb.FINISH_REASON_LENGTH
    assert response.usage.completion_tokens == 40
    assert set(response.sources) == {pb.SOURCE_DRAFTER, pb.SOURCE_EXPERT}


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
@pytest.mark.parametrize("method,rule,alpha", POLICIES)
def test_served_output_equals_in_process_output(client, local_engine, method, rule, alpha, sampling):
    # Pipelining off on both sides: then every count of work matches too (a pre-draft's passes
    # depend on timing; pipelining's output is checked below).
    response = client.generate(prompt=PROMPT, method=method, rule=rule, alpha=alpha, max_new_tokens=24, seed=3,
                               pipeline="off", **sampling)
    expected = in_process_policy(local_engine, method, rule, alpha, sampling, seed=3, max_new_tokens=24,
                                 pipeline="off")
    assert list(response.token_ids) == expected.token_ids
    assert list(response.sources) == [PROTO_BY_SOURCE[s] for s in expected.sources]
    stats = response.stats
    assert stats.method == PROTO_BY_METHOD[Method(method)]
    assert (stats.rule != pb.RULE_UNSPECIFIED) == (method == "cascade")
    for name in ("rounds", "drafted", "accepted", "deferred", "corrected", "bonus", "skipped_blocks",
                 "expert_passes", "drafter_passes", "tokens_from_drafter", "tokens_from_expert"):
        assert getattr(stats, name) == getattr(expected.stats, name), name
    if method == "expert":
        assert stats.drafter_passes == 0 and set(response.sources) == {pb.SOURCE_EXPERT}
    if method == "drafter":
        assert stats.expert_passes == 0 and set(response.sources) == {pb.SOURCE_DRAFTER}


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
@pytest.mark.parametrize("rule,alpha", [("lossless", 0.0), ("token", 0.3), ("token", 1.0), ("chow", 0.3),
                                        ("opt", 0.3), ("lossy", 0.3)])
def test_served_pipelining_changes_nothing_in_the_output(client, local_engine, rule, alpha, sampling):
    """The drafter tier drafts ahead while the expert tier verifies; a used pre-draft is the block
    a draft after the verdict would have made, so the output is the in-process one, every mode."""
    expected = in_process_policy(local_engine, "cascade", rule, alpha, sampling, seed=4, max_new_tokens=40)
    for mode in ("on", "auto", "off"):
        response = client.generate(prompt=PROMPT, rule=rule, alpha=alpha, max_new_tokens=40, seed=4, pipeline=mode,
                                   **sampling)
        assert list(response.token_ids) == expected.token_ids, mode
        assert response.stats.pipeline == {"on": pb.PIPELINE_ON, "auto": pb.PIPELINE_AUTO, "off": pb.PIPELINE_OFF}[mode]
        if mode == "off":
            assert response.stats.predrafts == 0
        elif rule != "chow":
            assert response.stats.predrafts > 0
            assert response.stats.predrafts_used + response.stats.predrafts_wasted == response.stats.predrafts
        if rule == "token" and alpha == 1.0 and mode == "on":  # every block kept: pre-drafts hit on guessed bonuses
            assert response.stats.predrafts_used > 0


@pytest.mark.parametrize("field,value", [("pipeline", 9), ("method", 42), ("rule", 99)])
def test_unknown_enum_value_is_invalid_argument(client, field, value):
    """A value from a newer contract, or a wrong one: refused, naming the field and value."""
    request = build_request(PROMPT)
    setattr(request.policy, field, value)
    with pytest.raises(grpc.RpcError) as error:
        client.generate(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"policy.{field}={value}" in error.value.details()


def test_a_tokenized_prompt_is_served_as_its_text_is(client, local_engine):
    ids = local_engine.encode(GenerationRequest(prompt=PROMPT))
    by_text = client.generate(prompt=PROMPT, rule="token", alpha=0.3, max_new_tokens=24, seed=2)
    by_ids = client.generate(prompt_token_ids=ids, rule="token", alpha=0.3, max_new_tokens=24, seed=2)
    assert list(by_ids.token_ids) == list(by_text.token_ids) and by_ids.usage.prompt_tokens == len(ids)


def test_stream_chunks_add_up_to_the_unary_response(client):
    options = dict(prompt=PROMPT, rule="token", alpha=0.3, max_new_tokens=30, seed=5)
    unary = client.generate(**options)
    chunks = list(client.stream(**options))
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == unary.text
    assert "".join(s.text for c in chunks for s in c.segments) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert [s for c in chunks for s in c.sources] == list(unary.sources)
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 30
    assert last.stats.rounds == unary.stats.rounds and last.stats.seed == 5
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


def test_chow_never_defer_skips_the_expert_and_equals_drafter_only(client, local_engine):
    response = client.generate(prompt=PROMPT, rule="chow", alpha=1.0, max_new_tokens=24)
    assert list(response.token_ids) == in_process(local_engine, method="drafter", max_new_tokens=24).token_ids
    assert response.stats.expert_passes == 0 and response.stats.skipped_blocks == response.stats.rounds
    assert set(response.sources) == {pb.SOURCE_DRAFTER}


def test_chat_messages_match_the_in_process_chat_encoding(client, local_engine):
    messages = [{"role": "user", "content": "Write hello world in Python."}]
    response = client.generate(messages=messages, rule="lossless", max_new_tokens=16)
    expected = local_engine.generate(GenerationRequest(messages=messages, method="expert", max_new_tokens=16))
    assert list(response.token_ids) == expected.token_ids
    assert response.usage.prompt_tokens == expected.prompt_tokens


@pytest.mark.parametrize("rule,alpha,sampling", [
    ("token", 0.3, dict(temperature=0.8, top_p=0.9)),  # sparse sampling rows
    ("lossless", 0.0, dict(temperature=1.0)),  # float16 sampling rows (their non-zeros)
    ("opt", 0.5, dict(temperature=0.7, top_k=20)),  # sparse rows + full decision rows
    ("diff", 0.1, dict(temperature=0.0)),  # greedy: tokens and max q only
])
def test_same_seed_same_output_across_calls(client, rule, alpha, sampling):
    options = dict(prompt=PROMPT, rule=rule, alpha=alpha, max_new_tokens=20, seed=1234, **sampling)
    first, second = client.generate(**options), client.generate(**options)
    assert list(first.token_ids) == list(second.token_ids) and first.text == second.text
    assert first.stats.seed == 1234


def test_greedy_rounds_ship_no_distributions(client):
    # Pipelining off: one draft call and one verify call per round (a pre-draft is a third call).
    greedy = client.generate(prompt=PROMPT, rule="diff", alpha=0.1, max_new_tokens=20, pipeline="off").stats
    sampled = client.generate(prompt=PROMPT, rule="lossless", temperature=1.0, max_new_tokens=20, seed=1,
                              pipeline="off").stats
    # Greedy: token ids and a few scalars per position beyond the resent context.
    assert (greedy.wire_bytes - greedy.context_bytes) / greedy.rounds < 200
    # Pure temperature sampling: the drafter's float16 rows over the 49152-token vocabulary, both ways
    # (draft reply, verify call); these peaked models' rows as their non-zero values and ids, under
    # the dense rows' bytes (`blocks.full_rows`).
    gamma = sampled.drafted / sampled.rounds
    dense = 2 * gamma * 49152 * 2
    assert 0.01 * dense < (sampled.wire_bytes - sampled.context_bytes) / sampled.rounds < 0.5 * dense


@pytest.mark.parametrize("options,field", [
    (dict(prompt=PROMPT, alpha=math.nan, rule="chow"), "alpha"),
    (dict(prompt=PROMPT, alpha=1.5, rule="chow"), "alpha"),
    (dict(prompt=PROMPT, alpha=-2.0, rule="diff"), "alpha"),
    (dict(prompt=PROMPT, block_size=0), "block_size"),
    (dict(prompt=PROMPT, block_size=65), "block_size"),
    (dict(prompt=PROMPT, max_new_tokens=0), "max_new_tokens"),
    (dict(prompt=PROMPT, max_new_tokens=401), "max_new_tokens"),
    (dict(prompt="   "), "prompt"),
    (dict(), "prompt"),
    (dict(prompt=PROMPT, temperature=-1.0), "temperature"),
    (dict(prompt=PROMPT, top_p=0.0, temperature=1.0), "top_p"),
    (dict(prompt="word " * 600), "prompt of"),  # longer than the 512-token context window
    (dict(prompt_token_ids=[]), "prompt_token_ids must hold at least one token id"),
    (dict(prompt_token_ids=[1, -5]), "prompt_token_ids[1]=-5 is not a token id"),
    (dict(prompt_token_ids=[1, 2**30]), "prompt_token_ids[1]=1073741824 is outside the vocabulary"),
])
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_bad_requests_are_invalid_argument_naming_the_field(client, options, field, streaming):
    with pytest.raises(grpc.RpcError) as error:
        if streaming:
            list(client.stream(**options))
        else:
            client.generate(**options)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()


def test_deadline_exceeded_stops_the_work_and_frees_the_caches(client, tier_handles):
    with pytest.raises(grpc.RpcError) as error:
        client.generate(prompt=PROMPT, rule="lossless", block_size=1, max_new_tokens=400, timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    router = tier_handles["Router"]
    assert wait_until(lambda: router.active_session_count.remote().result() == 0)
    assert wait_until(lambda: cached_sessions(tier_handles) == {"Drafter": 0, "Expert": 0})


def test_cancelled_stream_frees_the_session_in_both_tiers(client, tier_handles):
    call = client.stream(prompt=PROMPT, rule="lossless", block_size=1, max_new_tokens=400)
    first = next(call)
    assert first.token_ids
    assert cached_sessions(tier_handles) == {"Drafter": 1, "Expert": 1}
    call.cancel()
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    assert wait_until(lambda: cached_sessions(tier_handles) == {"Drafter": 0, "Expert": 0})
    assert tier_handles["Router"].active_session_count.remote().result() == 0


def test_a_sessions_calls_after_its_first_reach_each_tier_directly(client, tier_handles):
    """The default transport: Serve places the session with its first call to a tier; every later
    call, the release included, goes to that replica's own endpoint."""
    def calls():
        stats = {name: tier_handles[name].batch_stats.remote().result() for name in ("Drafter", "Expert")}
        return {name: (s["batched_requests"], s["direct_calls"]) for name, s in stats.items()}

    before = calls()
    result = client.generate(prompt=PROMPT, rule="lossless", block_size=2, max_new_tokens=24, pipeline="off")
    assert result.stats.rounds >= 4
    assert wait_until(lambda: cached_sessions(tier_handles) == {"Drafter": 0, "Expert": 0})  # released directly
    after = calls()
    for name in ("Drafter", "Expert"):
        batched, direct = (a - b for a, b in zip(after[name], before[name]))
        assert batched == result.stats.rounds
        assert direct == batched  # every call but the first, and the release


def test_the_tiers_count_their_passes_by_how_they_ran(client, tier_handles):
    """`batch_stats` (what `bench serve` and the metrics read): on the CPU every pass is eager, and
    sessions that fit the slots never lose them."""
    keys = ("forward_calls", "steps_graph", "steps_eager", "steps_wide", "steps_uncaptured", "slot_evictions")

    def stats():
        return {name: tier_handles[name].batch_stats.remote().result() for name in ("Drafter", "Expert")}

    before = stats()
    client.generate(prompt=PROMPT, rule="lossless", block_size=3, max_new_tokens=16, pipeline="off")
    after = stats()
    for name in ("Drafter", "Expert"):
        calls, graph, eager, wide, uncaptured, evictions = (after[name][key] - before[name][key] for key in keys)
        assert calls >= 2 and eager == calls
        assert graph == wide == uncaptured == evictions == 0


def test_finished_requests_leave_no_cached_sessions(client, tier_handles):
    client.generate(prompt=PROMPT, max_new_tokens=8)
    assert wait_until(lambda: cached_sessions(tier_handles) == {"Drafter": 0, "Expert": 0})


def test_health_is_serving(client):
    assert client.health() == "SERVING"
    assert client.health("speccascade.v1.SpecCascade") == "SERVING"
    with pytest.raises(grpc.RpcError) as error:
        client.health("no.such.Service")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(served):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(served) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"speccascade.v1.SpecCascade", "grpc.health.v1.Health"} <= services
        descriptor = database.FindFileContainingSymbol("speccascade.v1.SpecCascade")
        assert descriptor.name == "speccascade/v1/speccascade.proto"


def test_health_watch_streams_the_current_status(served):
    from grpc_health.v1 import health_pb2_grpc

    with grpc.insecure_channel(served) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(), metadata=(("application", SERVE_APP),), timeout=30)
        assert next(call).status == health_pb2.HealthCheckResponse.SERVING
        call.cancel()
