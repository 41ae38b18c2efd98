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


# ---- resuming a stream that broke off (ResumingStream, over a fake server) ----

import grpc  # noqa: E402
from speccascade.api.client import RESUME_ATTEMPTS, ResumingStream  # noqa: E402


class FakeError(grpc.RpcError):
    def __init__(self, code, trailing=(), details=None):
        self._code, self._trailing, self._details = code, trailing, details

    def code(self):
        return self._code

    def details(self):
        return self._details or self._code.name

    def trailing_metadata(self):
        return self._trailing


class FakeServer:
    """Streams chunks of output 0, 1, 2, ...; `breaks[i]` = (error, n): the i-th call fails with
    `error` after n chunks (0: before its first)."""

    def __init__(self, length: int, breaks: list):
        self.length = length
        self.breaks = list(breaks)
        self.requests: list[pb.GenerateRequest] = []

    def start(self, request, timeout):
        self.requests.append(request)
        position = int(request.resume_token.split(":")[1]) if request.resume_token else 0
        error, fail_after = self.breaks.pop(0) if self.breaks else (None, None)

        def chunks():
            nonlocal position
            sent = 0
            while position < self.length:
                if sent == fail_after:
                    raise error
                position += 1
                sent += 1
                yield pb.GenerateStreamResponse(token_ids=[position - 1], resume_token=f"t:{position}",
                                                finish_reason=pb.FINISH_REASON_LENGTH if position == self.length else 0)

        return chunks()


def stream(server, attempts=RESUME_ATTEMPTS):
    return ResumingStream(server.start, build_request("hi", seed=1), timeout=None, attempts=attempts)


def test_a_stream_that_breaks_off_is_resumed_from_the_last_token_with_the_same_request(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    unavailable, internal = FakeError(grpc.StatusCode.UNAVAILABLE), FakeError(grpc.StatusCode.INTERNAL)
    server = FakeServer(10, [(unavailable, 3), (internal, 2), (unavailable, 0)])
    call = stream(server)
    assert [t for chunk in call for t in chunk.token_ids] == list(range(10))
    assert call.resumes == 3
    assert [r.resume_token for r in server.requests] == ["", "t:3", "t:5", "t:5"]
    assert all(r.prompt == "hi" and r.sampling.seed == 1 for r in server.requests)


def test_resuming_is_bounded_and_leaves_other_errors_and_early_failures_alone(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    unavailable = FakeError(grpc.StatusCode.UNAVAILABLE)
    # Before the first chunk nothing broke off: the error is the caller's to see.
    with pytest.raises(grpc.RpcError):
        list(stream(FakeServer(5, [(unavailable, 0)])))
    # A bad request is not retried.
    with pytest.raises(grpc.RpcError) as error:
        list(stream(FakeServer(5, [(FakeError(grpc.StatusCode.INVALID_ARGUMENT), 2)])))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Tries in a row without a chunk are bounded.
    server = FakeServer(5, [(unavailable, 2)] + [(unavailable, 0)] * 3)
    with pytest.raises(grpc.RpcError):
        list(stream(server, attempts=3))
    assert len(server.requests) == 4
    with pytest.raises(grpc.RpcError):
        list(stream(FakeServer(5, [(unavailable, 2)]), attempts=0))


# What Serve's proxy answers for a call whose router replica was killed under it.
REPLICA_DIED = FakeError(grpc.StatusCode.INTERNAL, details="The actor died unexpectedly before finishing this task.\n"
                         "\tclass_name: ServeReplica:speccascade:Router\nThe actor is dead because it was killed")


def test_a_stream_whose_router_died_before_its_first_chunk_is_sent_again_as_it_was(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    server = FakeServer(4, [(REPLICA_DIED, 0), (REPLICA_DIED, 0)])
    call = stream(server)
    assert [t for chunk in call for t in chunk.token_ids] == list(range(4))
    assert call.resumes == 2 and [r.resume_token for r in server.requests] == ["", "", ""]
    # Any other INTERNAL before the first chunk is the server's answer to this request: not retried.
    with pytest.raises(grpc.RpcError):
        list(stream(FakeServer(4, [(FakeError(grpc.StatusCode.INTERNAL, details="division by zero"), 0)])))


class FakeStub:
    def __init__(self, errors: list):
        self.errors = list(errors)
        self.calls = []

    def Generate(self, message, metadata, timeout):
        self.calls.append(message)
        if self.errors:
            raise self.errors.pop(0)
        return pb.GenerateResponse(token_ids=[7])


def test_a_unary_call_whose_router_died_is_sent_again_and_others_are_not(monkeypatch):
    from speccascade.api.client import SpecCascadeClient

    waits = []
    monkeypatch.setattr("time.sleep", waits.append)
    busy = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, trailing=(("retry-after-ms", "800"),))
    with SpecCascadeClient("localhost:1") as client:
        client._stub = FakeStub([REPLICA_DIED, busy])
        assert list(client.generate(prompt="hi", seed=3).token_ids) == [7]
        assert client.resent_calls == 2 and waits == [0.25, 0.8]
        assert all(m.prompt == "hi" and m.sampling.seed == 3 for m in client._stub.calls)
        for first in (FakeError(grpc.StatusCode.UNAVAILABLE, details="the expert tier has no healthy replica"),
                      FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED), FakeError(grpc.StatusCode.INVALID_ARGUMENT)):
            client._stub = FakeStub([first])
            with pytest.raises(grpc.RpcError):
                client.generate(prompt="hi")
            assert len(client._stub.calls) == 1
        client._stub = FakeStub([REPLICA_DIED] * 3)
        with pytest.raises(grpc.RpcError):
            client.generate(prompt="hi", resume_attempts=2)
        assert len(client._stub.calls) == 3
        with pytest.raises(ValueError, match="resume_attempts must be an integer >= 0"):
            client.generate(prompt="hi", resume_attempts=-1)


def test_a_resume_waits_out_a_quota_held_by_the_dead_router(monkeypatch):
    waits = []
    monkeypatch.setattr("time.sleep", waits.append)
    busy = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, trailing=(("retry-after-ms", "1500"),))
    server = FakeServer(4, [(FakeError(grpc.StatusCode.INTERNAL), 1), (busy, 0)])
    assert [t for chunk in stream(server) for t in chunk.token_ids] == list(range(4))
    assert waits[1] == 1.5


def test_the_cli_resumes_as_often_as_the_client_by_default():
    from speccascade.commands.client import RESUME_ATTEMPTS as CLI_ATTEMPTS

    assert CLI_ATTEMPTS == RESUME_ATTEMPTS
