"""Tenants through real gRPC and the OpenAI HTTP routes: authentication, policy, quotas with retry
hints, hot reload without a restart (on a clock, with no traffic), fair admission, and isolation of
caches (a served app of its own, tiny models)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
import yaml
from ray import serve
from speccascade.api.client import SpecCascadeClient
from speccascade.api.v1 import speccascade_pb2 as pb
from speccascade.tenancy import key_digest, new_api_key

from ..served import PROMPT, app_args, deployed, wait_until

APP = "speccascade-tenants"
RELOAD_S = 0.2


@pytest.fixture(scope="module")
def keys():
    return {name: new_api_key() for name in ("acme", "auditor", "metered", "single", "off", "late", "rotated",
                                             "held", "watched")}


def tenants_document(keys, *extra) -> dict:
    entry = lambda name, **fields: {"id": name, "key_sha256": [key_digest(keys[name])], **fields}  # noqa: E731
    return {"tenants": [
        entry("acme", weight=2.0),
        entry("auditor", policy={"rules": ["lossless"], "default_rule": "lossless"}, limits={"max_new_tokens": 16}),
        entry("metered", limits={"output_tokens_per_minute": 60}),  # 1 token/s, burst 6
        entry("single", limits={"max_concurrent_requests": 1}),
        entry("off", disabled=True),
        entry("held", policy={"rules": ["lossless"]}),  # the README's `tenants add auditor --rules lossless`
        *extra,
    ]}


@pytest.fixture(scope="module")
def served_tenants(grpc_port, tiny_pair, tmp_path_factory, keys):
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(yaml.safe_dump(tenants_document(keys)))
    # The server's default rule is the shipped one (token), which a tenant held to lossless may not use.
    args = app_args(*tiny_pair, tenancy={"tenants_file": str(path), "reload_period_s": RELOAD_S},
                    policy={"rule": "token", "alpha": 0.5})
    with deployed(APP, args):
        yield f"127.0.0.1:{grpc_port}", path


def client_for(served_tenants, key=None):
    target, _ = served_tenants
    return SpecCascadeClient(target, application=APP, api_key=key or "")


def status_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


@pytest.mark.parametrize("key,fragment", [(None, "missing API key"), ("sc-wrong", "unknown API key")])
def test_a_missing_or_unknown_key_is_unauthenticated(served_tenants, key, fragment):
    with client_for(served_tenants, key) as client:
        for call in (lambda: client.generate(prompt=PROMPT, max_new_tokens=4),
                     lambda: list(client.stream(prompt=PROMPT, max_new_tokens=4))):
            error = status_of(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and fragment in error.details()
        assert client.health() == "SERVING"  # health stays open


def test_a_key_works_as_bearer_or_x_api_key(served_tenants, keys):
    with client_for(served_tenants, keys["acme"]) as client:
        assert len(client.generate(prompt=PROMPT, max_new_tokens=6).token_ids) == 6
    target, _ = served_tenants
    with grpc.insecure_channel(target) as channel:
        from speccascade.api.client import build_request
        from speccascade.api.v1 import speccascade_pb2_grpc as pb_grpc

        response = pb_grpc.SpecCascadeStub(channel).Generate(
            build_request(PROMPT, max_new_tokens=5), metadata=(("application", APP), ("x-api-key", keys["acme"])))
        assert len(response.token_ids) == 5


def test_a_disabled_tenant_and_requests_outside_the_allowance_are_denied_naming_the_field(served_tenants, keys):
    with client_for(served_tenants, keys["off"]) as client:
        error = status_of(lambda: client.generate(prompt=PROMPT, max_new_tokens=4))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "tenant 'off' is disabled" in error.details()
    with client_for(served_tenants, keys["auditor"]) as client:
        error = status_of(lambda: client.generate(prompt=PROMPT, rule="token", max_new_tokens=4))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "policy.rule='token'" in error.details()
        error = status_of(lambda: client.generate(prompt=PROMPT, rule="lossless", max_new_tokens=40))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "max_new_tokens=40" in error.details()
        # Its defaults: lossless, and no more than its 16-token limit.
        response = client.generate(prompt=PROMPT)
        assert response.stats.rule == pb.RULE_LOSSLESS and len(response.token_ids) == 16


def test_tokens_per_minute_refuses_with_a_retry_hint(served_tenants, keys):
    with client_for(served_tenants, keys["metered"]) as client:
        assert len(client.generate(prompt=PROMPT, max_new_tokens=20).token_ids) == 20  # runs the bucket into debt
        call = client._stub.Generate.with_call
        with pytest.raises(grpc.RpcError) as error:
            call(client._request(None, dict(prompt=PROMPT, max_new_tokens=4)), metadata=client.metadata)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "output_tokens_per_minute=60" in error.value.details()
        retry_ms = int(dict(error.value.trailing_metadata())["retry-after-ms"])
        assert 10_000 <= retry_ms <= 20_000  # ~14 tokens of debt at 1 token/s


def test_concurrency_limit_refuses_a_second_request_while_the_first_runs(served_tenants, keys):
    with client_for(served_tenants, keys["single"]) as client:
        first = client.stream(prompt=PROMPT, rule="lossless", block_size=1, max_new_tokens=300)
        next(first)
        error = status_of(lambda: client.generate(prompt=PROMPT, max_new_tokens=4))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_requests=1" in error.details()
        assert any(k == "retry-after-ms" for k, _ in error.trailing_metadata())
        first.cancel()
    with client_for(served_tenants, keys["single"]) as client:  # the slot is free again
        assert wait_until(lambda: _succeeds(client))


def _succeeds(client) -> bool:
    try:
        client.generate(prompt=PROMPT, max_new_tokens=2)
        return True
    except grpc.RpcError:
        return False


def test_tenants_are_added_rotated_and_disabled_without_a_restart(served_tenants, keys):
    _, path = served_tenants
    late = {"id": "late", "key_sha256": [key_digest(keys["late"])]}
    with client_for(served_tenants, keys["late"]) as client:
        assert status_of(lambda: client.generate(prompt=PROMPT, max_new_tokens=2)).code() == \
            grpc.StatusCode.UNAUTHENTICATED
        path.write_text(yaml.safe_dump(tenants_document(keys, late)))
        assert wait_until(lambda: _succeeds(client))
    # Rotation: a second key works beside the first, then replaces it.
    late["key_sha256"].append(key_digest(keys["rotated"]))
    path.write_text(yaml.safe_dump(tenants_document(keys, late)))
    with client_for(served_tenants, keys["rotated"]) as client:
        assert wait_until(lambda: _succeeds(client))
    with client_for(served_tenants, keys["late"]) as client:
        assert _succeeds(client)
        late["key_sha256"] = [key_digest(keys["rotated"])]
        path.write_text(yaml.safe_dump(tenants_document(keys, late)))
        assert wait_until(lambda: not _succeeds(client))
        assert status_of(lambda: client.generate(prompt=PROMPT, max_new_tokens=2)).code() == \
            grpc.StatusCode.UNAUTHENTICATED
    # A broken file keeps the last good tenants.
    path.write_text("tenants: [{id: broken, key_sha256: [not-hex]}]")
    time.sleep(3 * RELOAD_S)
    with client_for(served_tenants, keys["rotated"]) as client:
        assert _succeeds(client) and _succeeds(client)
    # Disabling.
    late["disabled"] = True
    path.write_text(yaml.safe_dump(tenants_document(keys, late)))
    with client_for(served_tenants, keys["rotated"]) as client:
        assert wait_until(lambda: not _succeeds(client))
        assert status_of(lambda: client.generate(prompt=PROMPT, max_new_tokens=2)).code() == \
            grpc.StatusCode.PERMISSION_DENIED


def test_caches_are_keyed_by_tenant_and_no_session_id_crosses_tenants(served_tenants, keys):
    handles = {name: serve.get_deployment_handle(name, app_name=APP) for name in ("Drafter", "Expert")}
    with client_for(served_tenants, keys["acme"]) as acme, client_for(served_tenants, keys["auditor"]) as auditor:
        first = acme.stream(prompt=PROMPT, rule="lossless", block_size=1, max_new_tokens=300)
        second = auditor.stream(prompt=PROMPT, max_new_tokens=16)
        next(first)
        next(second)
        for handle in handles.values():
            by_tenant = handle.cached_sessions_by_tenant.remote().result()
            assert set(by_tenant) <= {"acme", "auditor"} and by_tenant.get("acme") == 1
        # `speccascade status` sees acme's request in flight (a router replica posts within 0.5 s of a change).
        from speccascade.commands.status import format_tenant_load, read_tenant_load

        assert wait_until(lambda: read_tenant_load(APP)["active"].get("acme") == 1, timeout=15)
        assert "acme 1" in format_tenant_load(read_tenant_load(APP))
        first.cancel()
        list(second)
    assert wait_until(lambda: read_tenant_load(APP)["active"] == {}, timeout=20)


# ----------------------------------------------------------- the same limits over the OpenAI routes

def http_call(served_tenants, http_port, path: str, key: str | None = None, body: dict | None = None
              ) -> tuple[int, dict]:
    """(status, JSON body) of a call to the OpenAI routes of the tenants' application."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/{APP}/v1{path}", headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def completion(**fields) -> dict:
    return {"model": "speccascade", "prompt": PROMPT, "max_tokens": 4, **fields}


@pytest.mark.parametrize("method", ["drafter", "token-cascade", "sequence-cascade"])
def test_a_tenant_held_to_lossless_gets_no_method_whose_output_is_not_the_experts(
        served_tenants, http_port, keys, method):
    with client_for(served_tenants, keys["held"]) as client:
        error = status_of(lambda: client.generate(prompt=PROMPT, method=method, alpha=0.3, max_new_tokens=4))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details().startswith(f"policy.method='{method}' is not allowed for tenant 'held': ")
        assert "held to rules lossless (methods it may use: cascade, expert)" in error.details()
    status, body = http_call(served_tenants, http_port, "/completions", keys["held"],
                             completion(method=method, alpha=0.3))
    assert status == 403 and body["error"]["param"] == "method" and body["error"]["code"] == "permission_denied"
    assert body["error"]["message"].startswith(f"policy.method='{method}' is not allowed for tenant 'held': ")


def test_a_tenant_held_to_lossless_without_a_default_rule_serves_requests_that_name_no_rule(
        served_tenants, http_port, keys):
    with client_for(served_tenants, keys["held"]) as client:
        response = client.generate(prompt=PROMPT, max_new_tokens=4)
        assert response.stats.rule == pb.RULE_LOSSLESS and len(response.token_ids) == 4
        assert len(client.generate(prompt=PROMPT, method="expert", max_new_tokens=4).token_ids) == 4
    status, body = http_call(served_tenants, http_port, "/completions", keys["held"], completion())
    assert status == 200 and body["speccascade"]["policy"] == {
        "method": "cascade", "rule": "lossless", "alpha": 0.5, "block_size": 4, "pipeline": "auto"}
    status, body = http_call(served_tenants, http_port, "/completions", keys["held"], completion(method="expert"))
    assert status == 200 and body["usage"]["completion_tokens"] == 4


def test_a_missing_key_is_explained_in_each_protocols_terms(served_tenants, http_port):
    with client_for(served_tenants) as client:
        details = status_of(lambda: client.generate(prompt=PROMPT, max_new_tokens=4)).details()
    assert details == "missing API key: send the metadata `authorization: Bearer <key>` (or `x-api-key: <key>`)"
    for path, body in (("/models", None), ("/completions", completion())):
        status, answer = http_call(served_tenants, http_port, path, None, body)
        assert status == 401 and answer["error"]["message"] == (
            "missing API key: send the header `Authorization: Bearer <key>` (or `X-API-Key: <key>`)")


def test_an_idle_server_sees_a_changed_tenants_file_on_every_route(served_tenants, http_port, keys):
    """No generate call in between: a key added, disabled, then revoked changes what the model list
    answers within the reload period."""
    _, path = served_tenants
    watched = {"id": "watched", "key_sha256": [key_digest(keys["watched"])]}

    def models_status() -> int:
        return http_call(served_tenants, http_port, "/models", keys["watched"])[0]

    assert models_status() == 401
    path.write_text(yaml.safe_dump(tenants_document(keys, watched)))
    assert wait_until(lambda: models_status() == 200, timeout=10 * RELOAD_S + 5)
    path.write_text(yaml.safe_dump(tenants_document(keys, {**watched, "disabled": True})))
    assert wait_until(lambda: models_status() == 403, timeout=10 * RELOAD_S + 5)
    path.write_text(yaml.safe_dump(tenants_document(keys)))  # revoked
    assert wait_until(lambda: models_status() == 401, timeout=10 * RELOAD_S + 5)
    status, body = http_call(served_tenants, http_port, "/models", keys["watched"])
    assert body["error"]["message"] == "unknown API key"
