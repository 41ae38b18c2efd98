"""Resumable streams, served: a stream cut after some chunks and sent again with the last chunk's
resume token goes on token-identically, over gRPC and the OpenAI routes, greedy and sampled, for
several rules; altered tokens, another tenant's and another request's are refused by name; and with
two router replicas, 8 streams through the Python client all finish, identical to uninterrupted
ones, when the router replica serving them is killed mid-stream."""

from __future__ import annotations

import threading
import time

import grpc
import openai
import pytest
import ray
import yaml
from speccascade.api.client import SpecCascadeClient, build_request
from speccascade.engine.request import GenerationRequest
from speccascade.options import SamplingParams
from speccascade.serving.replicas import replica_actor_names
from speccascade.tenancy import key_digest, new_api_key

from ..served import PROMPT, app_args, deployed

SAMPLED = dict(temperature=0.8, top_p=0.95)
POLICIES = [("cascade", "lossless", 0.0, {}), ("cascade", "token", 0.3, SAMPLED), ("cascade", "chow", 0.3, SAMPLED),
            ("cascade", "lossy", 0.3, {}), ("sequence-cascade", "lossless", 0.3, SAMPLED), ("expert", "lossless", 0.0, SAMPLED)]


def in_process(engine, method, rule, alpha, sampling, *, seed, max_new_tokens, block_size) -> list[int]:
    return engine.generate(GenerationRequest(
        prompt=PROMPT, method=method, rule=rule, alpha=alpha, block_size=block_size, max_new_tokens=max_new_tokens,
        sampling=SamplingParams(**sampling), seed=seed, ignore_eos=True)).token_ids


def tokens_of(chunks) -> list[int]:
    return [t for chunk in chunks for t in chunk.token_ids]


def text_of(chunks) -> str:
    return "".join(chunk.text for chunk in chunks)


def altered(token: str) -> str:
    prefix, body, signature = token.split(".")
    middle = len(body) // 2
    return f"{prefix}.{body[:middle]}{'A' if body[middle] != 'A' else 'B'}{body[middle + 1:]}.{signature}"


@pytest.mark.parametrize("method,rule,alpha,sampling", POLICIES,
                         ids=[f"{m}-{r}-{'sampled' if s else 'greedy'}" for m, r, _, s in POLICIES])
def test_a_grpc_stream_cut_and_resumed_is_token_identical(client, local_engine, method, rule, alpha, sampling):
    options = dict(method=method, rule=rule, alpha=alpha, max_new_tokens=40, block_size=3, ignore_eos=True,
                   **sampling)
    whole = list(client.stream(prompt=PROMPT, seed=13, **options))
    expected = in_process(local_engine, method, rule, alpha, sampling, seed=13, max_new_tokens=40, block_size=3)
    assert tokens_of(whole) == expected
    assert all(chunk.resume_token for chunk in whole)

    def cut_and_resume(cut: int, **seed):
        call = client.stream(build_request(PROMPT, **seed, **options), resume_attempts=0)
        head = [next(call) for _ in range(cut)]
        call.cancel()
        resumed = build_request(PROMPT, **seed, **options)
        resumed.resume_token = head[-1].resume_token
        rest = list(client.stream(resumed))
        assert rest[-1].usage.completion_tokens == 40
        return (head + rest if tokens_of(head) else rest), rest[-1].stats.seed  # nothing delivered: it starts over

    for cut in (1, 4):
        chunks, seed = cut_and_resume(cut, seed=13)
        assert seed == 13
        assert tokens_of(chunks) == tokens_of(whole) and text_of(chunks) == text_of(whole)
        assert chunks[-1].finish_reason == whole[-1].finish_reason
    # No seed given: the server draws one, and the token carries it to the resumed request.
    chunks, seed = cut_and_resume(4)
    twin = list(client.stream(build_request(PROMPT, seed=seed, **options)))
    assert tokens_of(chunks) == tokens_of(twin) and text_of(chunks) == text_of(twin)


def test_an_altered_token_or_another_request_is_invalid_argument_naming_the_field(client):
    head = next(iter(client.stream(prompt=PROMPT, rule="token", alpha=0.3, max_new_tokens=20, seed=1)))
    for token, fragment in ((altered(head.resume_token), "resume_token: the signature does not verify"),
                            ("not-a-token", "resume_token is not a resume token")):
        request = build_request(PROMPT, rule="token", alpha=0.3, max_new_tokens=20)
        request.resume_token = token
        with pytest.raises(grpc.RpcError) as error:
            list(client.stream(request))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.value.details()
    for changed, named in ((dict(rule="lossless", alpha=0.0), "rule"), (dict(prompt="x = 1"), "another request")):
        request = build_request(**{"prompt": PROMPT, "rule": "token", "alpha": 0.3, "max_new_tokens": 20, **changed})
        request.resume_token = head.resume_token
        with pytest.raises(grpc.RpcError) as error:
            list(client.stream(request))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("resume_token:") and named in error.value.details()


@pytest.fixture
def oai(openai_base_url):
    with openai.OpenAI(base_url=openai_base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.8, top_p=0.95)], ids=["greedy", "sampled"])
def test_an_openai_stream_resumes_from_the_token_sent_back_in_extra_body(oai, sampling):
    body = dict(model="speccascade", messages=[{"role": "user", "content": "Write a function that adds."}],
                max_tokens=40, seed=5, stream=True, extra_body={"rule": "token", "alpha": 0.3, "ignore_eos": True},
                **sampling)
    whole = list(oai.chat.completions.create(**body))
    text = "".join(e.choices[0].delta.content or "" for e in whole if e.choices)
    tokens = [e.model_extra.get("resume_token") for e in whole if e.choices and e.choices[0].delta.content]
    assert tokens and all(tokens)
    stream = oai.chat.completions.create(**body)
    head, token = "", None
    for event in stream:
        if event.choices and event.choices[0].delta.content:
            head += event.choices[0].delta.content
            token = event.model_extra["resume_token"]
            if len(head) >= 8:
                break
    stream.close()
    rest = oai.chat.completions.create(**{**body, "extra_body": {**body["extra_body"], "resume_token": token}})
    assert head + "".join(e.choices[0].delta.content or "" for e in rest if e.choices) == text

    with pytest.raises(openai.BadRequestError) as error:
        oai.chat.completions.create(**{**body, "extra_body": {**body["extra_body"], "resume_token": altered(token)}})
    assert error.value.body["param"] == "resume_token" and "signature does not verify" in error.value.body["message"]


# ---- two router replicas: a router killed mid-stream ----

APP = "speccascade-resume"
STREAMS = 8


@pytest.fixture(scope="module")
def keys():
    return {name: new_api_key() for name in ("acme", "other")}


@pytest.fixture(scope="module")
def two_routers(grpc_port, tiny_pair, tmp_path_factory, keys):
    folder = tmp_path_factory.mktemp("resume")
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": [
        {"id": name, "key_sha256": [key_digest(key)]} for name, key in keys.items()]}))
    (folder / "resume.key").write_text(new_api_key())  # any secret of 32 bytes or more
    args = app_args(*tiny_pair, router={"replicas": {"min_replicas": 2, "max_replicas": 2},
                                        "resume_key_file": str(folder / "resume.key")},
                    tenancy={"tenants_file": str(folder / "tenants.yaml")})
    with deployed(APP, args, routers=2):
        yield f"127.0.0.1:{grpc_port}"


def test_another_tenants_token_is_permission_denied(two_routers, keys):
    options = dict(prompt=PROMPT, max_new_tokens=16, seed=3)
    with SpecCascadeClient(two_routers, application=APP, api_key=keys["acme"]) as acme:
        head = next(iter(acme.stream(**options)))
    request = build_request(**options)
    request.resume_token = head.resume_token
    with SpecCascadeClient(two_routers, application=APP, api_key=keys["other"]) as other:
        with pytest.raises(grpc.RpcError) as error:
            list(other.stream(request))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "resume_token: the token was issued to another tenant" in error.value.details()


def test_streams_survive_their_router_replica_being_killed(two_routers, keys, local_engine):
    options = dict(prompt=PROMPT, rule="lossless", block_size=1, max_new_tokens=240, ignore_eos=True)
    expected = in_process(local_engine, "cascade", "lossless", 0.0, {}, seed=0, max_new_tokens=240, block_size=1)
    outputs: dict[int, list[int]] = {}
    resumes: dict[int, int] = {}
    errors: list[BaseException] = []
    started = threading.Barrier(STREAMS + 1)

    def one(index: int):
        try:
            with SpecCascadeClient(two_routers, application=APP, api_key=keys["acme"]) as client:
                call = client.stream(**options)
                tokens = list(next(call).token_ids)
                started.wait()
                for chunk in call:
                    tokens += chunk.token_ids
                outputs[index], resumes[index] = tokens, call.resumes
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)
            started.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    started.wait(timeout=120)  # every stream has its first chunk
    time.sleep(1.0)
    routers = replica_actor_names(APP, "Router")
    ray.kill(ray.get_actor(routers[0], namespace="serve"), no_restart=True)
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(outputs) == STREAMS
    for index, tokens in outputs.items():
        assert tokens == expected, index
    assert sum(resumes.values()) >= 1  # some streams ran on the killed replica and were resumed
