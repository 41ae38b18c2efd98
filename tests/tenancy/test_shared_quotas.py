"""Quotas across router replicas, through real gRPC: with two router replicas a tenant still gets
one request at a time and one token budget (the application's quota ledger, a named Ray actor);
with the ledger unreachable, an application that fails closed refuses with UNAVAILABLE and a
retry hint, and recovers once the ledger is back (a served app of its own, tiny models)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray
import yaml
from speccascade.api.client import SpecCascadeClient
from speccascade.serving.quota_ledger import ledger_name
from speccascade.status_board import NAMESPACE
from speccascade.tenancy import key_digest, new_api_key

from ..served import PROMPT, app_args, deployed

APP = "speccascade-shared-quotas"
STREAMS = 6


@pytest.fixture(scope="module")
def keys():
    return {name: new_api_key() for name in ("single", "metered")}


@pytest.fixture(scope="module")
def two_routers(grpc_port, tiny_pair, tmp_path_factory, keys):
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": [
        {"id": "single", "key_sha256": [key_digest(keys["single"])], "limits": {"max_concurrent_requests": 1}},
        {"id": "metered", "key_sha256": [key_digest(keys["metered"])],
         "limits": {"output_tokens_per_minute": 60}},  # 1 token/s, a burst of 3
    ]}))
    args = app_args(*tiny_pair, router={"replicas": {"min_replicas": 2, "max_replicas": 2}},
                    tenancy={"tenants_file": str(path), "quota_ledger_unreachable": "closed",
                             "quota_ledger_timeout_s": 1.0})
    with deployed(APP, args, routers=2):
        yield f"127.0.0.1:{grpc_port}"


def concurrent_streams(target: str, key: str, count: int) -> list[grpc.StatusCode]:
    """`count` long streams started at once (each through its own channel, so Serve's proxy
    spreads them over the router replicas); the status each ended with."""
    codes: list[grpc.StatusCode] = []
    start = threading.Barrier(count)

    def one():
        with SpecCascadeClient(target, application=APP, api_key=key) as client:
            start.wait()
            try:
                list(client.stream(prompt=PROMPT, max_new_tokens=64))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return codes


def test_one_concurrency_limit_holds_across_two_router_replicas(two_routers, keys):
    codes = concurrent_streams(two_routers, keys["single"], STREAMS)
    # Counted per replica, each of the two routers would admit one of them.
    assert sorted(codes, key=str) == sorted([grpc.StatusCode.OK] + [grpc.StatusCode.RESOURCE_EXHAUSTED] *
                                            (STREAMS - 1), key=str)
    ledger = ray.get_actor(ledger_name(APP), namespace=NAMESPACE)
    deadline = time.monotonic() + 30
    while ray.get(ledger.active.remote()) and time.monotonic() < deadline:  # the ticket is given back
        time.sleep(0.2)
    assert ray.get(ledger.active.remote()) == {}


def test_the_output_token_budget_is_one_for_both_router_replicas(two_routers, keys):
    # The bucket (3 tokens of burst) is spent by the first request's output, whichever router
    # served it; every later request at once is refused, whichever router it reaches.
    with SpecCascadeClient(two_routers, application=APP, api_key=keys["metered"]) as client:
        client.generate(prompt=PROMPT, max_new_tokens=16)
    time.sleep(1.5)  # a sync period: the tokens reach the ledger
    codes = concurrent_streams(two_routers, keys["metered"], 4)
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4


class SilentLedger:
    """Stands in for the quota ledger under its name, and never answers in time."""

    def admit(self, *args):
        time.sleep(30)

    def sync(self, *args):
        time.sleep(30)

    def release(self, *args):
        pass


def test_an_unreachable_ledger_fails_closed_with_unavailable_then_recovers(two_routers, keys):
    ray.kill(ray.get_actor(ledger_name(APP), namespace=NAMESPACE))
    deadline = time.monotonic() + 30
    while True:  # the name is free once Ray has seen the ledger die
        try:
            impostor = ray.remote(SilentLedger).options(name=ledger_name(APP), namespace=NAMESPACE,
                                                         num_cpus=0).remote()
            break
        except ValueError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    try:
        with SpecCascadeClient(two_routers, application=APP, api_key=keys["single"]) as client:
            with pytest.raises(grpc.RpcError) as error:
                client.generate(prompt=PROMPT, max_new_tokens=4)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "quota ledger did not answer within 1s" in error.value.details()
            assert "retry-after-ms" in dict(error.value.trailing_metadata())
    finally:
        ray.kill(impostor)
    with SpecCascadeClient(two_routers, application=APP, api_key=keys["single"]) as client:
        deadline = time.monotonic() + 30  # each router makes the ledger again on its next admission
        while True:
            try:
                assert client.generate(prompt=PROMPT, max_new_tokens=4).text is not None
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.5)
