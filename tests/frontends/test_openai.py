"""The OpenAI-compatible HTTP API of the served application, called with the official `openai`
client (tiny fp32 models on a local Ray cluster, the same application the gRPC tests call)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from speccascade.engine.request import GenerationRequest

from ..served import PROMPT, in_process, in_process_policy, wait_until

MODEL = "speccascade"
MESSAGES = [{"role": "user", "content": "Write hello world in Python."}]


@pytest.fixture(scope="module")
def oai(openai_base_url):
    with openai.OpenAI(base_url=openai_base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def extra(model_object, name: str):
    """An extra (non-OpenAI) field of a response object, as the client keeps it."""
    return model_object.model_extra[name]


def segments_text(segments: list[dict]) -> str:
    return "".join(s["text"] for s in segments)


# ------------------------------------------------------------------------------------- non-streamed

def test_completion_equals_the_in_process_expert_greedy_output(oai, local_engine):
    response = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, extra_body={"rule": "lossless"})
    expected = in_process(local_engine, max_new_tokens=24)  # lossless greedy is the expert's greedy output
    (choice,) = response.choices
    assert choice.text == expected.text
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 24 and response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.total_tokens == response.usage.prompt_tokens + 24
    assert response.object == "text_completion" and response.model == MODEL
    segments = extra(choice, "segments")
    assert segments_text(segments) == choice.text
    assert {s["source"] for s in segments} == {"drafter", "expert"}  # the drafter really contributed
    stats = extra(response, "speccascade")["stats"]
    assert stats["tokens_from_drafter"] + stats["tokens_from_expert"] == 24
    assert stats["expert_passes"] < 24


@pytest.mark.parametrize("method,rule,alpha,sampling", [
    ("cascade", "chow", 0.3, {}),
    ("cascade", "token", 0.3, dict(temperature=0.8, top_p=0.9)),
    ("cascade", "opt", 0.5, dict(temperature=0.7, top_k=20)),
    ("token-cascade", None, 0.3, {}),
    ("expert", None, None, dict(temperature=1.0)),
])
def test_extra_body_policy_equals_the_same_policy_in_process(oai, local_engine, method, rule, alpha, sampling):
    body = {"method": method, "block_size": 4, "pipeline": "on"}
    body.update({k: v for k, v in (("rule", rule), ("alpha", alpha)) if v is not None})
    openai_sampling = {k: v for k, v in sampling.items() if k != "top_k"}
    if "top_k" in sampling:
        body["top_k"] = sampling["top_k"]
    response = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, seed=3, extra_body=body,
                                      **openai_sampling)
    expected = in_process_policy(local_engine, method, rule or "lossless", alpha if alpha is not None else 0.0,
                                 sampling, seed=3, max_new_tokens=24)
    assert response.choices[0].text == expected.text
    used = extra(response, "speccascade")
    assert used["seed"] == 3 and used["policy"]["method"] == method
    if method == "cascade":
        assert used["policy"] == {"method": "cascade", "rule": rule, "alpha": alpha, "block_size": 4, "pipeline": "on"}
    assert used["stats"]["rounds"] == expected.stats.rounds
    assert used["stats"]["deferred"] == expected.stats.deferred


def test_chat_completion_matches_grpc_and_the_in_process_chat_encoding(oai, client, local_engine):
    response = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16,
                                           extra_body={"rule": "lossless"})
    expected = local_engine.generate(GenerationRequest(messages=MESSAGES, method="expert", max_new_tokens=16))
    grpc_response = client.generate(messages=MESSAGES, rule="lossless", max_new_tokens=16)
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text == grpc_response.text
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert segments_text(extra(choice, "segments")) == choice.message.content


def test_stop_strings_cut_the_text_and_finish_with_stop(oai, local_engine):
    full = in_process(local_engine, max_new_tokens=24).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    response = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, stop=[stop],
                                      extra_body={"rule": "lossless"})
    (choice,) = response.choices
    assert choice.finish_reason == "stop"
    assert choice.text == full[:full.index(stop)]


# ------------------------------------------------------------------------------------------ streamed

def test_streamed_chat_completion_carries_provenance_and_adds_up(oai):
    options = dict(model=MODEL, messages=MESSAGES, max_tokens=30, seed=5, extra_body={"rule": "token", "alpha": 0.3})
    unary = oai.chat.completions.create(**options)
    chunks = list(oai.chat.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 2  # streamed round by round, not in one piece
    text = "".join(c.choices[0].delta.content for c in content)
    assert text == unary.choices[0].message.content
    for chunk in content:  # every chunk says which model produced its text
        segments = extra(chunk.choices[0], "segments")
        assert segments_text(segments) == chunk.choices[0].delta.content
        assert {s["source"] for s in segments} <= {"drafter", "expert"}
    (finish,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish.choices[0].finish_reason == "length"
    assert extra(finish, "speccascade")["stats"]["rounds"] == extra(unary, "speccascade")["stats"]["rounds"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert len({c.id for c in chunks}) == 1


def test_streamed_completion_equals_the_unary_completion(oai):
    options = dict(model=MODEL, prompt=PROMPT, max_tokens=20, seed=11, temperature=0.9,
                   extra_body={"rule": "diff", "alpha": 0.1})
    unary = oai.completions.create(**options)
    chunks = list(oai.completions.create(**options, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == unary.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    streamed_sources = [s["source"] for c in chunks for s in extra(c.choices[0], "segments")]
    assert set(streamed_sources) <= {"drafter", "expert"} and streamed_sources


def test_a_client_that_leaves_mid_stream_stops_the_decoding(oai, tier_handles):
    """Closing the HTTP stream cancels the request: the router ends the session (and asks both
    tiers to free it, the same release as a cancelled gRPC call) and no tier works on it."""
    stream = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, stream=True,
                                    extra_body={"rule": "lossless", "block_size": 1})
    next(iter(stream))
    stream.close()
    router = tier_handles["Router"]
    assert wait_until(lambda: router.active_session_count.remote().result() == 0, timeout=30)

    def expert_passes() -> int:
        return tier_handles["Expert"].batch_stats.remote().result()["forward_calls"]

    before = expert_passes()
    time.sleep(2.0)  # 400 tokens one expert pass each would still be running
    assert expert_passes() == before


# ------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("body,param", [
    ({"rule": "chow", "alpha": 1.5}, "alpha"),
    ({"rule": "diff", "alpha": -2.0}, "alpha"),
    ({"rule": "chow", "alpha": "high"}, "alpha"),
    ({"rule": "fastest"}, "rule"),
    ({"method": "oracle"}, "method"),
    ({"pipeline": "sideways"}, "pipeline"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": 65}, "block_size"),
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 401}, "max_tokens"),  # above the server's cap
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0, "temperature": 1.0}, "top_p"),
    ({"n": 2}, "n"),
    ({"alpah": 0.3}, "alpah"),  # a misspelt extra field is refused, not ignored
    ({"logprobs": 6}, "logprobs"),  # above the legacy completions API's 5 alternatives
    ({"prompt": "word " * 600}, "prompt"),  # longer than the 512-token context window
    ({"min_tokens": 9}, "min_tokens"),  # above max_tokens=8
    ({"repetition_penalty": 1.2}, "repetition_penalty"),  # cannot be exact under the cascade: a 400 with why
    ({"ignore_eos": "sometimes"}, "ignore_eos"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_bad_requests_are_openai_400_errors_naming_the_field(oai, body, param, stream):
    options, body = dict(model=MODEL, prompt=PROMPT, max_tokens=8), dict(body)
    known = {k: body.pop(k) for k in list(body) if k in ("prompt", "max_tokens", "temperature", "top_p", "n",
                                                           "logprobs")}
    options.update(known)
    with pytest.raises(openai.BadRequestError) as error:
        result = oai.completions.create(**options, stream=stream, extra_body=body)
        list(result) if stream else None
    assert error.value.status_code == 400
    assert set(error.value.body) == {"message", "type", "param", "code"}
    assert error.value.body["type"] == "invalid_request_error"
    assert error.value.body["param"] == param
    assert param in error.value.body["message"]


def test_a_bad_alpha_in_a_streamed_chat_is_an_openai_error(oai):
    with pytest.raises(openai.BadRequestError) as error:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, extra_body={"rule": "chow", "alpha": 2})
    assert error.value.body == {
        "message": "alpha=2.0 is out of range for rule 'chow': expected [0, 1] (defer iff max q < 1 - alpha)",
        "type": "invalid_request_error", "param": "alpha", "code": None,
    }


def test_chat_messages_are_checked_like_grpc(oai):
    with pytest.raises(openai.BadRequestError) as error:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}])
    assert error.value.body["param"] == "messages"


def test_an_unknown_model_is_a_404(oai):
    with pytest.raises(openai.NotFoundError) as error:
        oai.completions.create(model="gpt-4o", prompt=PROMPT)
    assert error.value.body["code"] == "model_not_found" and "'speccascade'" in error.value.body["message"]


# -------------------------------------------------------------------------------- models and health

def test_models_lists_the_served_pair(oai, tiny_pair):
    (model,) = oai.models.list().data
    assert model.id == MODEL
    assert (extra(model, "drafter"), extra(model, "expert")) == tiny_pair
    assert oai.models.retrieve(MODEL).id == MODEL


def test_health_is_serving(openai_base_url):
    with urllib.request.urlopen(openai_base_url.removesuffix("/v1") + "/health", timeout=30) as response:
        assert response.status == 200 and json.load(response) == {"status": "SERVING"}


def test_vllms_tokenizer_routes_use_the_served_pairs_tokenizer(openai_base_url, local_engine):
    root = openai_base_url.removesuffix("/v1")

    def call(path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(f"{root}{path}", data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    ids = local_engine.encode(GenerationRequest(prompt=PROMPT))
    answer = call("/tokenize", {"model": MODEL, "prompt": PROMPT})
    assert answer["tokens"] == ids and answer["count"] == len(ids) and answer["max_model_len"] == 512
    chat = call("/tokenize", {"messages": [{"role": "user", "content": "Say hi"}]})
    assert chat["tokens"] == local_engine.encode(GenerationRequest(messages=[{"role": "user", "content": "Say hi"}]))
    assert call("/detokenize", {"tokens": ids}) == {"prompt": local_engine.tokenizer.decode(ids)}
    info = call("/tokenizer_info")
    assert info["eos_token"] == local_engine.tokenizer.eos_token and info["model_max_length"] == 512
    with pytest.raises(urllib.error.HTTPError) as error:
        call("/detokenize", {"tokens": [10**9]})
    assert error.value.code == 400 and json.load(error.value)["error"]["param"] == "tokens"


# ---------------------------------------------------------------- vLLM's extensions (load testers)

EOS_INDEX = 6  # where the early-EOS application's extra end-of-sequence token first appears


def sse_events(url: str, body: dict) -> list[dict]:
    """POST `body` as is (the exact JSON a tool sends) and read the server-sent events."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        lines = [line.decode().strip() for line in response]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.fixture(scope="class")
def early_eos(http_port, tiny_pair, tmp_path_factory, local_engine):
    """(OpenAI base URL, application name, the EOS id, the full output of 24 tokens, the
    in-process engine with that EOS)."""
    import copy
    import shutil
    from pathlib import Path

    from ray import serve
    from speccascade.app import build_app

    from ..served import app_args

    full = in_process(local_engine, max_new_tokens=24)
    eos = full.token_ids[EOS_INDEX]
    assert full.token_ids.index(eos) == EOS_INDEX, full.token_ids
    drafter_dir, expert_dir = tiny_pair
    early_expert = tmp_path_factory.mktemp("early-eos") / "expert"
    shutil.copytree(expert_dir, early_expert)
    config_path = Path(early_expert) / "generation_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["eos_token_id"] = sorted(local_engine.eos_ids | {eos})
    config_path.write_text(json.dumps(config))
    engine = copy.copy(local_engine)  # the same models, this EOS too
    engine.eos_ids = frozenset(config["eos_token_id"])
    name = "speccascade-early-eos"
    serve.run(build_app(app_args(drafter_dir, str(early_expert))), name=name, route_prefix=f"/{name}")
    try:
        yield f"http://127.0.0.1:{http_port}/{name}/v1", name, eos, full, engine
    finally:
        serve.delete(name)


@pytest.fixture(scope="class")
def early_oai(early_eos):
    with openai.OpenAI(base_url=early_eos[0], api_key="unused", max_retries=0, timeout=120) as client:
        yield client


class TestVllmExtensions:
    """ignore_eos, min_tokens and continuous usage stats, served, on the tiny pair whose expert has
    one more end-of-sequence id: the token its greedy output has at EOS_INDEX, so a request stops
    early there unless told otherwise (the tiny random models never emit their real EOS)."""

    def test_ignore_eos_runs_to_max_tokens_past_the_eos(self, early_eos, early_oai):
        _, _, _, full, engine = early_eos
        stopped = early_oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24)
        assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == EOS_INDEX
        assert stopped.choices[0].text == in_process(engine, max_new_tokens=24).text
        ignored = early_oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                               extra_body={"ignore_eos": True})
        (choice,) = ignored.choices
        assert choice.finish_reason == "length" and ignored.usage.completion_tokens == 24
        assert choice.text == full.text  # the EOS is an ordinary output token, not special text

    def test_ignore_eos_over_grpc(self, early_eos, served):
        from speccascade.api.client import SpecCascadeClient

        _, name, _, full, _ = early_eos
        with SpecCascadeClient(served, application=name) as grpc_client:
            assert len(grpc_client.generate(prompt=PROMPT, max_new_tokens=24).token_ids) == EOS_INDEX
            response = grpc_client.generate(prompt=PROMPT, max_new_tokens=24, ignore_eos=True)
            assert list(response.token_ids) == full.token_ids
            masked = grpc_client.generate(prompt=PROMPT, max_new_tokens=24, min_tokens=EOS_INDEX + 4)
            assert len(masked.token_ids) >= EOS_INDEX + 4

    def test_min_tokens_masks_the_eos_as_in_process(self, early_eos, early_oai):
        _, _, eos, full, engine = early_eos
        min_tokens = EOS_INDEX + 6
        expected = in_process(engine, method="cascade", rule="lossless", alpha=0.0, block_size=4,
                              max_new_tokens=24, min_tokens=min_tokens)
        assert len(expected.token_ids) >= min_tokens and eos not in expected.token_ids[:min_tokens]
        assert expected.token_ids[EOS_INDEX] != eos  # the expert's next choice, not the EOS
        for chat in (False, True):
            if chat:
                response = early_oai.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=24, extra_body={"min_tokens": min_tokens})
                reference = engine.generate(GenerationRequest(messages=MESSAGES, max_new_tokens=24,
                                                              min_tokens=min_tokens, rule="lossless", alpha=0.0,
                                                              block_size=4))
                text = response.choices[0].message.content
            else:
                response = early_oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                                        extra_body={"min_tokens": min_tokens})
                reference, text = expected, response.choices[0].text
            assert text == reference.text
            assert response.usage.completion_tokens == len(reference.token_ids) >= min_tokens

    def test_guidellms_streamed_chat_gets_usage_in_every_chunk(self, early_eos):
        """The body guidellm 0.8.1 sends for a fixed output length, as is."""
        base_url = early_eos[0]
        body = {"model": MODEL, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                "max_completion_tokens": 20, "stop": None, "ignore_eos": True,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Write hello world."}]}]}
        events = sse_events(f"{base_url}/chat/completions", body)
        assert all("usage" in event for event in events)
        usages = [event["usage"] for event in events]
        prompt_tokens = usages[0]["prompt_tokens"]
        assert prompt_tokens > 0 and usages[0]["completion_tokens"] == 0  # the role chunk: nothing yet
        for usage in usages:
            assert usage["prompt_tokens"] == prompt_tokens
            assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
        completions = [usage["completion_tokens"] for usage in usages]
        assert completions == sorted(completions)  # cumulative
        content = [event for event in events if event["choices"] and event["choices"][0]["delta"].get("content")]
        assert len({u["completion_tokens"] for u in usages}) > 2  # it grows round by round
        final = events[-1]
        assert final["choices"] == [] and final["usage"]["completion_tokens"] == 20  # ignore_eos: all of them
        assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["usage"] == final["usage"]
        assert content and all(e["usage"]["completion_tokens"] > 0 for e in content)

    def test_vllm_bench_serves_default_completion_body(self, early_eos):
        """The body `vllm bench serve --ignore-eos` sends to /v1/completions, as is."""
        base_url, _, _, full, _ = early_eos
        body = {"model": MODEL, "prompt": PROMPT, "repetition_penalty": 1.0, "max_tokens": 24, "logprobs": None,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.0}
        events = sse_events(f"{base_url}/completions", body)
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == full.text
        assert [e for e in events if "usage" in e] == [events[-1]]  # usage only at the end, as asked
        assert events[-1]["usage"]["completion_tokens"] == 24


# ------------------------------------------------------------------------------------------ tenants

@pytest.fixture(scope="module")
def tenanted(http_port, tiny_pair, tmp_path_factory):
    """The application with a tenants file: (API key by tenant, OpenAI base URL)."""
    from ray import serve
    from speccascade.app import build_app
    from speccascade.tenancy import Tenant, TenantLimits, TenantPolicy, TenantsFile, key_digest, new_api_key

    from ..served import app_args

    keys = {name: new_api_key() for name in ("acme", "auditor", "metered")}
    tenants = TenantsFile(tenants=[
        Tenant(id="acme", key_sha256=[key_digest(keys["acme"])]),
        Tenant(id="auditor", key_sha256=[key_digest(keys["auditor"])], policy=TenantPolicy(rules=["lossless"])),
        Tenant(id="metered", key_sha256=[key_digest(keys["metered"])],
               limits=TenantLimits(output_tokens_per_minute=1)),  # one request, then a long wait
    ])
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants.save(path)
    name = "speccascade-tenants"
    serve.run(build_app(app_args(*tiny_pair, tenancy={"tenants_file": str(path)})), name=name, route_prefix=f"/{name}")
    try:
        yield keys, f"http://127.0.0.1:{http_port}/{name}/v1"
    finally:
        serve.delete(name)


def tenant_client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def test_tenants_call_with_their_api_key_and_others_are_refused(tenanted):
    keys, base_url = tenanted
    with tenant_client(base_url, keys["acme"]) as acme:
        response = acme.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                                extra_body={"rule": "chow", "alpha": 0.3})
        assert response.choices[0].message.content and response.usage.completion_tokens == 8
        assert [m.id for m in acme.models.list().data] == [MODEL]
    tokenize = urllib.request.Request(f"{base_url.removesuffix('/v1')}/tokenize", method="POST",
                                      data=json.dumps({"prompt": "hi"}).encode(),
                                      headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:  # the tokenizer routes want a key too
        urllib.request.urlopen(tokenize, timeout=30)
    assert error.value.code == 401
    tokenize.add_header("Authorization", f"Bearer {keys['acme']}")
    with urllib.request.urlopen(tokenize, timeout=30) as response:
        assert json.load(response)["count"] > 0
    with tenant_client(base_url, "sc-not-a-key") as stranger:
        for call in (lambda: stranger.models.list(),
                     lambda: stranger.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)):
            with pytest.raises(openai.AuthenticationError) as error:
                call()
            assert error.value.status_code == 401
            assert error.value.body["type"] == "authentication_error"
    anonymous = urllib.request.Request(f"{base_url}/chat/completions", method="POST",
                                       data=json.dumps({"model": MODEL, "messages": MESSAGES}).encode(),
                                       headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(anonymous, timeout=30)
    assert error.value.code == 401 and json.load(error.value)["error"]["code"] == "invalid_api_key"


def test_a_tenants_allowance_is_a_403_naming_the_field(tenanted):
    keys, base_url = tenanted
    with tenant_client(base_url, keys["auditor"]) as auditor:
        with pytest.raises(openai.PermissionDeniedError) as error:
            auditor.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, extra_body={"rule": "chow"})
    assert error.value.status_code == 403
    assert error.value.body["param"] == "rule" and "'auditor'" in error.value.body["message"]


def test_a_tenant_over_its_quota_gets_a_429_with_a_retry_hint(tenanted):
    keys, base_url = tenanted
    with tenant_client(base_url, keys["metered"]) as metered:
        metered.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16)  # runs the bucket into debt
        with pytest.raises(openai.RateLimitError) as error:
            metered.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16)
    assert error.value.status_code == 429 and error.value.body["code"] == "rate_limit_exceeded"
    headers = error.value.response.headers
    assert int(headers["retry-after-ms"]) > 60_000 and int(headers["retry-after"]) * 1000 >= int(headers["retry-after-ms"])
