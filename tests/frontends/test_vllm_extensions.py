"""vLLM's request extensions (what guidellm and `vllm bench serve` send) through both front-ends'
mappings to the engine's request: honoured fields arrive in the request, the rest are refused with
a reason. The served behaviour is tested end to end in test_openai.py."""

from __future__ import annotations

import pytest
from speccascade.api.client import build_request
from speccascade.config.app import CascadePolicy
from speccascade.engine.generation import GenerationChunk, GenerationResult
from speccascade.engine.stats import GenerationStats, Source
from speccascade.engine.text import Segment
from speccascade.frontends.grpc.convert import request_from_proto
from speccascade.frontends.openai.mapping import Reply, RunningUsage, generation_request
from speccascade.frontends.openai.protocol import ChatCompletionBody, CompletionBody, OpenAIError, parse_body
from speccascade.serving.clients import Transport

POLICY = CascadePolicy(max_new_tokens=32, max_new_tokens_cap=400)

# guidellm 0.8.1 (backends/openai/request_handlers.py), streamed chat with a fixed output length.
GUIDELLM_CHAT = {
    "model": "speccascade", "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    "max_completion_tokens": 16, "stop": None, "ignore_eos": True,
    "messages": [{"role": "user", "content": [{"type": "text", "text": "a synthetic prompt"}]}],
}
# guidellm 0.8.1, text completions.
GUIDELLM_COMPLETION = {
    "model": "speccascade", "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    "max_tokens": 16, "stop": None, "ignore_eos": True, "prompt": "a synthetic prompt",
}
# vLLM's `bench serve` (vllm/benchmarks/lib/endpoint_request_func.py), with --ignore-eos; serve.py
# adds temperature 0.0 (greedy) to every body unless --temperature is given.
VLLM_BENCH_COMPLETION = {
    "model": "speccascade", "prompt": "a synthetic prompt", "repetition_penalty": 1.0, "max_tokens": 16,
    "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    "temperature": 0.0,
}
VLLM_BENCH_CHAT = {
    "model": "speccascade", "messages": [{"role": "user", "content": [{"type": "text", "text": "a prompt"}]}],
    "max_completion_tokens": 16, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    "temperature": 0.0,
}


def mapped(raw: dict, body_type=CompletionBody):
    return generation_request(parse_body(raw, body_type), POLICY)


def refusal(raw: dict, body_type=CompletionBody) -> OpenAIError:
    with pytest.raises(OpenAIError) as error:
        mapped(raw, body_type)
    assert error.value.status == 400
    return error.value


@pytest.mark.parametrize("raw,body_type", [
    (GUIDELLM_CHAT, ChatCompletionBody), (GUIDELLM_COMPLETION, CompletionBody),
    (VLLM_BENCH_COMPLETION, CompletionBody), (VLLM_BENCH_CHAT, ChatCompletionBody),
], ids=["guidellm-chat", "guidellm-completion", "vllm-bench-completion", "vllm-bench-chat"])
def test_the_load_testers_default_bodies_are_accepted_and_honoured(raw, body_type):
    body = parse_body(raw, body_type)
    request = generation_request(body, POLICY)
    assert request.ignore_eos is True and request.max_new_tokens == 16
    assert request.min_tokens == 0 and request.skip_special_tokens is True and request.stop == ()
    assert body.stream_options.include_usage
    assert body.stream_options.continuous_usage_stats is ("continuous_usage_stats" in raw["stream_options"])


def test_min_tokens_and_skip_special_tokens_reach_the_engine_request():
    request = mapped({"model": "speccascade", "prompt": "hi", "max_tokens": 20, "min_tokens": 7,
                      "skip_special_tokens": False})
    assert (request.min_tokens, request.skip_special_tokens, request.ignore_eos) == (7, False, False)


@pytest.mark.parametrize("raw,param,fragment", [
    ({"min_tokens": 21, "max_tokens": 20}, "min_tokens", "min_tokens=21 is out of range: expected 0..max_tokens (20)"),
    # Unset max_tokens is the server's default (32 here): min_tokens may not exceed it either.
    ({"min_tokens": 33}, "min_tokens", "min_tokens=33 is out of range: expected 0..max_tokens (32)"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens=-1 is out of range"),
    ({"min_tokens": 2.5}, "min_tokens", "min_tokens: Input should be a valid integer"),
    ({"ignore_eos": "maybe"}, "ignore_eos", "ignore_eos: Input should be a valid boolean"),
    ({"skip_special_tokens": 2}, "skip_special_tokens", "skip_special_tokens: Input should be a valid boolean"),
    ({"stream_options": {"continuous_usage_stats": True}}, "stream_options",
     "stream_options is only allowed with stream=true"),
    ({"stream": True, "stream_options": {"continuous_usage": True}}, "stream_options.continuous_usage",
     "unknown field 'stream_options.continuous_usage'"),
    ({"min_p": 0.1}, "min_p", "unknown field 'min_p'"),  # a vLLM field this server does not take: named
])
def test_bad_extension_values_are_400s_naming_the_field(raw, param, fragment):
    error = refusal({"model": "speccascade", "prompt": "hi", **raw})
    assert error.param == param
    assert fragment in error.message


def test_a_repetition_penalty_is_refused_with_the_reason_and_one_is_accepted():
    for neutral in (1, 1.0, None):
        mapped({"model": "speccascade", "prompt": "hi", "repetition_penalty": neutral})
    error = refusal({"model": "speccascade", "prompt": "hi", "repetition_penalty": 1.2})
    assert error.param == "repetition_penalty" and error.code == "unsupported_parameter"
    assert error.message.startswith("repetition_penalty=1.2 is not supported by this server: ")
    assert "raw logit by its sign" in error.message and "1.0 (no penalty) is accepted" in error.message


def test_grpc_requests_carry_the_same_extensions():
    request = request_from_proto(build_request("hi", max_new_tokens=20, ignore_eos=True, min_tokens=5,
                                               skip_special_tokens=False), POLICY)
    assert (request.ignore_eos, request.min_tokens, request.skip_special_tokens) == (True, 5, False)
    unset = request_from_proto(build_request("hi"), POLICY)
    assert (unset.ignore_eos, unset.min_tokens, unset.skip_special_tokens) == (False, 0, True)
    with pytest.raises(ValueError, match=r"min_tokens=21 is out of range: expected 0..max_new_tokens \(20\)"):
        request_from_proto(build_request("hi", max_new_tokens=20, min_tokens=21), POLICY)


def chunk(tokens: list[int], text: str = "", result: GenerationResult | None = None) -> GenerationChunk:
    return GenerationChunk([Segment(text, Source.EXPERT)] if text else [], tokens, [Source.EXPERT] * len(tokens),
                           result=result)


def test_continuous_usage_is_cumulative_in_every_event_and_ends_at_the_final_usage():
    request = mapped({"model": "speccascade", "prompt": "hi", "max_tokens": 5})
    result = GenerationResult(text="abcde", token_ids=[1, 2, 3, 4, 5], sources=[], finish_reason="length",
                              prompt_tokens=3, seed=0, stats=GenerationStats())
    reply, running = Reply.new("chat"), RunningUsage(prompt_tokens=3)
    events = reply.first_chunks(usage=running.json())
    for piece in (chunk([1, 2], "ab"), chunk([3], ""), chunk([4, 5], "cde", result)):
        events += reply.chunks(piece, request, Transport(), include_usage=True, usage=running.add(piece))
    usages = [(e["usage"]["prompt_tokens"], e["usage"]["completion_tokens"], e["usage"]["total_tokens"])
              for e in events]
    # role chunk, "ab", (no event for a round without text), "cde", the finish chunk, the usage chunk
    assert usages == [(3, 0, 3), (3, 2, 5), (3, 5, 8), (3, 5, 8), (3, 5, 8)]
    assert events[-1]["choices"] == [] and events[-2]["choices"][0]["finish_reason"] == "length"
    # Without continuous usage no chunk but the last carries usage.
    plain = Reply.new("completion").chunks(chunk([1], "a", result), request, Transport(), include_usage=True)
    assert ["usage" in e for e in plain] == [False, False, True]
