"""Logprobs and echo through the OpenAI mapping, without a server: the request fields reach the
engine's request (or are refused naming the field), and the engine's numbers come out in OpenAI's
chat shape and the legacy completions shape, whole and streamed. (Served: test_openai_logprobs.py.)"""

from __future__ import annotations

import math

import pytest
from speccascade.config.app import CascadePolicy
from speccascade.engine.generation import GenerationChunk, GenerationResult
from speccascade.engine.stats import GenerationStats, Source
from speccascade.engine.text import Segment
from speccascade.frontends.openai.mapping import Reply, TokenTexts, choice_extras, generation_request
from speccascade.frontends.openai.protocol import ChatCompletionBody, CompletionBody, OpenAIError, parse_body
from speccascade.serving.clients import Transport

POLICY = CascadePolicy(max_new_tokens=32, max_new_tokens_cap=400)
CHAT = {"model": "speccascade", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "speccascade", "prompt": "ab"}


class FakeTokenizer:
    """Byte-level pieces: id 0 'Ġa' (' a'), 1 'b', 2 'Ã©' (the bytes of 'é'), 3 'Ã' (half of it), 4 '▁x'."""

    PIECES = {0: "Ġa", 1: "b", 2: "Ã©", 3: "Ã", 4: "▁x"}

    def convert_ids_to_tokens(self, token_id):
        return self.PIECES[token_id]

    def decode(self, ids):
        return {4: " x"}[ids[0]]


TEXTS = TokenTexts(FakeTokenizer())


def mapped(raw: dict, body_type):
    return generation_request(parse_body(raw, body_type), POLICY)


def refusal(raw: dict, body_type) -> OpenAIError:
    with pytest.raises(OpenAIError) as error:
        mapped(raw, body_type)
    assert error.value.status == 400
    return error.value


def test_chat_logprobs_reach_the_engine():
    assert mapped({**CHAT, "logprobs": True, "top_logprobs": 4}, ChatCompletionBody).logprobs == 4
    assert mapped({**CHAT, "logprobs": True}, ChatCompletionBody).logprobs == 0
    request = mapped({**CHAT, "logprobs": False}, ChatCompletionBody)
    assert request.logprobs is None and request.prompt_logprobs is None


def test_completion_logprobs_and_echo_reach_the_engine():
    assert mapped({**COMPLETION, "logprobs": 2}, CompletionBody).logprobs == 2
    echoed = mapped({**COMPLETION, "logprobs": 1, "echo": True, "max_tokens": 0}, CompletionBody)
    assert (echoed.logprobs, echoed.prompt_logprobs, echoed.max_new_tokens) == (1, 1, 0)
    assert mapped({**COMPLETION, "echo": True}, CompletionBody).prompt_logprobs is None  # echo: text only


@pytest.mark.parametrize("raw,body_type,param", [
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, ChatCompletionBody, "top_logprobs"),
    ({**CHAT, "logprobs": True, "top_logprobs": -1}, ChatCompletionBody, "top_logprobs"),
    ({**CHAT, "top_logprobs": 2}, ChatCompletionBody, "top_logprobs"),
    ({**CHAT, "logprobs": False, "top_logprobs": 2}, ChatCompletionBody, "top_logprobs"),
    ({**COMPLETION, "logprobs": 6}, CompletionBody, "logprobs"),
    ({**COMPLETION, "logprobs": -1}, CompletionBody, "logprobs"),
    ({**COMPLETION, "max_tokens": 0}, CompletionBody, "max_tokens"),
    ({**COMPLETION, "echo": True, "max_tokens": 0}, CompletionBody, "max_tokens"),
    ({**CHAT, "max_tokens": 0, "logprobs": True}, ChatCompletionBody, "max_tokens"),
    ({**COMPLETION, "top_logprobs": 2}, CompletionBody, "top_logprobs"),  # a chat field
    ({**CHAT, "echo": True}, ChatCompletionBody, "echo"),  # a completions field
], ids=["chat-k-21", "chat-k-negative", "chat-k-without-logprobs", "chat-k-logprobs-false", "completion-6",
        "completion-negative", "zero-tokens", "zero-tokens-echo-only", "chat-zero-tokens", "top-on-completion",
        "echo-on-chat"])
def test_bad_logprobs_fields_are_400s_naming_the_field(raw, body_type, param):
    assert refusal(raw, body_type).param == param


def test_token_texts_are_exact_bytes_of_byte_level_pieces():
    assert TEXTS(0) == (" a", [32, 97])
    assert TEXTS(2) == ("é", [0xC3, 0xA9])
    assert TEXTS(3) == ("\ufffd", [0xC3])  # half a character: its byte, shown as U+FFFD
    assert TEXTS(4) == (" x", [32, 120])  # not byte-level: decoded alone


def result(**fields) -> GenerationResult:
    values = dict(text=" ab", token_ids=[0, 1], sources=[Source.DRAFTER, Source.EXPERT], finish_reason="length",
                  prompt_tokens=2, seed=1, stats=GenerationStats(),
                  logprobs=[(-0.5, ((0, -0.5), (1, -1.5))), (-float("inf"), ((2, -0.1), (0, -2.0)))])
    return GenerationResult(**{**values, **fields})


def test_chat_shape():
    extras = choice_extras(parse_body({**CHAT, "logprobs": True, "top_logprobs": 2}, ChatCompletionBody), [], TEXTS)
    out = Reply.new("chat", extras=extras).response(result(), [], mapped(CHAT, ChatCompletionBody), Transport())
    content = out["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": " a", "logprob": -0.5, "bytes": [32, 97], "top_logprobs": [
        {"token": " a", "logprob": -0.5, "bytes": [32, 97]}, {"token": "b", "logprob": -1.5, "bytes": [98]}]}
    assert content[1]["logprob"] == -9999.0  # no mass: JSON has no -inf
    assert [t["token"] for t in content[1]["top_logprobs"]] == ["é", " a"]


def test_completion_shape_with_echo():
    body = parse_body({**COMPLETION, "logprobs": 1, "echo": True}, CompletionBody)
    extras = choice_extras(body, [1, 0], TEXTS)
    prompt_logprobs = [None, (-2.0, ((1, -0.2),))]
    out = Reply.new("completion", extras=extras).response(result(prompt_logprobs=prompt_logprobs), [],
                                                          mapped(COMPLETION, CompletionBody), Transport())
    choice = out["choices"][0]
    assert choice["text"] == "ab" + " ab"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["b", " a", " a", "b"]
    assert logprobs["token_logprobs"] == [None, -2.0, -0.5, -9999.0]
    # the top k, and the token itself (as vLLM lists it)
    assert logprobs["top_logprobs"] == [None, {"b": -0.2, " a": -2.0}, {" a": -0.5, "b": -1.5},
                                        {"é": -0.1, " a": -2.0, "b": -9999.0}]
    assert logprobs["text_offset"] == [0, 1, 3, 5]


def test_echo_without_logprobs_is_text_only():
    extras = choice_extras(parse_body({**COMPLETION, "echo": True}, CompletionBody), [1, 0], TEXTS)
    out = Reply.new("completion", extras=extras).response(result(logprobs=None), [], mapped(COMPLETION, CompletionBody),
                                                          Transport())
    assert out["choices"][0]["text"] == "ab ab" and out["choices"][0]["logprobs"] is None
    assert choice_extras(parse_body(COMPLETION, CompletionBody), [1], TEXTS) is None


def chunk(tokens, text, logprobs, final=None, prompt_logprobs=None) -> GenerationChunk:
    return GenerationChunk([Segment(text, Source.EXPERT)] if text else [], tokens, [Source.EXPERT] * len(tokens),
                           result=final, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def test_streamed_completion_logprobs_add_up_to_the_whole_and_go_with_their_tokens():
    body = parse_body({**COMPLETION, "logprobs": 1, "echo": True, "stream": True}, CompletionBody)
    request = mapped({**COMPLETION, "stream": True}, CompletionBody)
    reply = Reply.new("completion", extras=choice_extras(body, [1, 0], TEXTS))
    whole = result(prompt_logprobs=[None, (-2.0, ((1, -0.2),))])
    first = reply.chunks(chunk([0], " a", whole.logprobs[:1], prompt_logprobs=whole.prompt_logprobs), request,
                         Transport(), include_usage=False)
    # A token whose text is held back (a possible stop string) still brings its logprobs.
    held = reply.chunks(chunk([1], "", whole.logprobs[1:]), request, Transport(), include_usage=False)
    last = reply.chunks(chunk([], "b", [], final=whole), request, Transport(), include_usage=False)
    texts = "".join(e["choices"][0]["text"] for e in first + held + last)
    assert texts == "ab ab"
    parts = [e["choices"][0]["logprobs"] for e in first + held + last if e["choices"][0]["logprobs"]]
    assert [t for p in parts for t in p["tokens"]] == ["b", " a", " a", "b"]
    assert [o for p in parts for o in p["text_offset"]] == [0, 1, 3, 5]
    assert [v for p in parts for v in p["token_logprobs"]] == [None, -2.0, -0.5, -9999.0]


def test_streamed_chat_logprobs():
    body = parse_body({**CHAT, "logprobs": True, "top_logprobs": 1, "stream": True}, ChatCompletionBody)
    reply = Reply.new("chat", extras=choice_extras(body, [5], TEXTS))
    events = reply.chunks(chunk([0, 1], " ab", [(-0.5, ((0, -0.5),)), (-1.0, ((1, -1.0),))]),
                          mapped({**CHAT, "stream": True}, ChatCompletionBody), Transport(), include_usage=False)
    (event,) = events
    assert event["choices"][0]["delta"] == {"content": " ab"}
    content = event["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [" a", "b"] and math.isclose(content[1]["logprob"], -1.0)
