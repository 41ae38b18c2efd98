"""Building requests in the Python client: unset options stay unset (server defaults apply)."""

from __future__ import annotations

import pytest
from speccascade.api.client import build_request
from speccascade.api.v1 import speccascade_pb2 as pb


def test_unset_options_are_absent():
    request = build_request("hi")
    assert request.prompt == "hi" and request.WhichOneof("input") == "prompt"
    assert not request.HasField("max_new_tokens")
    assert not request.policy.HasField("alpha") and request.policy.rule == pb.RULE_UNSPECIFIED
    assert not request.sampling.HasField("seed") and not request.sampling.HasField("temperature")


def test_set_options_including_zeros_are_present():
    request = build_request(messages=[{"role": "user", "content": "x"}], rule="Chow", alpha=0.0, block_size=3,
                            max_new_tokens=9, temperature=0.0, seed=0, stop=["\n\n"])
    assert request.WhichOneof("input") == "chat" and request.chat.messages[0].content == "x"
    assert request.policy.rule == pb.RULE_CHOW and request.policy.HasField("alpha")
    assert request.sampling.HasField("temperature") and request.sampling.HasField("seed")
    assert (request.policy.block_size, request.max_new_tokens, list(request.stop)) == (3, 9, ["\n\n"])


def test_unknown_rule_is_refused_client_side():
    with pytest.raises(ValueError, match="unknown rule 'fast'"):
        build_request("hi", rule="fast")


def test_method_is_sent_and_an_unknown_one_refused_client_side():
    assert build_request("hi", method="token-cascade").policy.method == pb.METHOD_TOKEN_CASCADE
    assert build_request("hi").policy.method == pb.METHOD_UNSPECIFIED
    with pytest.raises(ValueError, match="unknown method 'beam'"):
        build_request("hi", method="beam")


def test_api_key_travels_as_bearer_metadata_from_the_argument_or_the_environment(monkeypatch):
    from speccascade.api.client import API_KEY_ENV, SpecCascadeClient

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with SpecCascadeClient("localhost:1", application="app") as client:
        assert client.metadata == (("application", "app"),)
    with SpecCascadeClient("localhost:1", api_key="sc-abc") as client:
        assert ("authorization", "Bearer sc-abc") in client.metadata
    monkeypatch.setenv(API_KEY_ENV, "sc-env")
    with SpecCascadeClient("localhost:1") as client:
        assert client.metadata == (("authorization", "Bearer sc-env"),)
