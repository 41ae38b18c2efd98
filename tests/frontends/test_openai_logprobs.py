"""Logprobs and echo, served (tiny fp32 models on a local Ray cluster): over HTTP with the official
`openai` client (chat and completions, streamed and not, echo with max_tokens 0 and
lm-evaluation-harness's own log-likelihood body) and over gRPC. A served request's numbers are the
in-process engine's (whose numbers tests/engine/test_logprobs.py checks against a direct
computation); the prompt's are checked against the expert's log_softmax directly."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
import torch
from speccascade.api.client import build_request
from speccascade.engine.request import GenerationRequest
from speccascade.frontends.openai.mapping import TokenTexts
from speccascade.options import SamplingParams

from ..served import PROMPT

MODEL = "speccascade"
MESSAGES = [{"role": "user", "content": "Write hello world in Python."}]
SAMPLED = dict(temperature=0.7, top_p=0.95)
TOL = dict(rel=1e-4, abs=1e-4)  # the same fp32 code, but the tiers prefill the prompt in chunks of their own


@pytest.fixture(scope="module")
def oai(openai_base_url):
    with openai.OpenAI(base_url=openai_base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def in_process(engine, *, k: int, prompt_logprobs: int | None = None, sampling: dict | None = None, **kwargs):
    kwargs.setdefault("prompt", None if "messages" in kwargs else PROMPT)
    return engine.generate(GenerationRequest(block_size=4, sampling=SamplingParams(**(sampling or {})), logprobs=k,
                                             prompt_logprobs=prompt_logprobs, **kwargs))


def expert_prompt_logprobs(engine, prompt: list[int]) -> list[float]:
    """The expert's log-probability of each prompt token after the first, by one full pass."""
    with torch.no_grad():
        logits = engine.expert.model(torch.tensor([prompt])).logits[0].float()
    rows = torch.log_softmax(logits[:, : engine.expert.vocab_size], dim=-1)
    return [float(rows[i - 1, prompt[i]]) for i in range(1, len(prompt))]


def assert_chat_content(content, expected, texts: TokenTexts, k: int) -> None:
    assert len(content) == len(expected.token_ids)
    for item, token, (logprob, top) in zip(content, expected.token_ids, expected.logprobs):
        assert item.token == texts(token)[0] and item.bytes == texts(token)[1]
        assert item.logprob == pytest.approx(logprob, **TOL)
        assert len(item.top_logprobs) == k
        assert [t.token for t in item.top_logprobs] == [texts(i)[0] for i, _ in top]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([v for _, v in top], **TOL)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_logprobs_are_the_in_process_engines(oai, local_engine, stream):
    """The token rule, sampled: its target blends q and p, so the block carries q's exact rows."""
    policy = {"rule": "token", "alpha": 0.4}
    expected = in_process(local_engine, k=3, messages=MESSAGES, max_new_tokens=20, seed=7, sampling=SAMPLED, **policy)
    call = dict(model=MODEL, messages=MESSAGES, max_tokens=20, seed=7, logprobs=True, top_logprobs=3, extra_body=policy,
                **SAMPLED)
    if stream:
        content = [item for chunk in oai.chat.completions.create(stream=True, **call) for choice in chunk.choices
                   if choice.logprobs for item in choice.logprobs.content]
    else:
        response = oai.chat.completions.create(**call)
        assert response.choices[0].message.content == expected.text
        content = response.choices[0].logprobs.content
    assert_chat_content(content, expected, TokenTexts(local_engine.tokenizer), k=3)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_logprobs_are_the_in_process_engines(oai, local_engine, stream):
    """chow at a middle alpha, greedy: skipped blocks and undeferred positions are the drafter's q."""
    policy = {"rule": "chow", "alpha": 0.4}
    expected = in_process(local_engine, k=2, max_new_tokens=24, seed=3, **policy)
    call = dict(model=MODEL, prompt=PROMPT, max_tokens=24, seed=3, logprobs=2, extra_body=policy)
    if stream:
        parts = [choice.logprobs for chunk in oai.completions.create(stream=True, **call) for choice in chunk.choices
                 if choice.logprobs]
        logprobs = {name: [v for part in parts for v in getattr(part, name)]
                    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    else:
        response = oai.completions.create(**call)
        assert response.choices[0].text == expected.text
        logprobs = response.choices[0].logprobs.model_dump()
    texts = TokenTexts(local_engine.tokenizer)
    assert logprobs["tokens"] == [texts(t)[0] for t in expected.token_ids]
    assert logprobs["token_logprobs"] == pytest.approx([lp for lp, _ in expected.logprobs], **TOL)
    for alternatives, token, (logprob, top) in zip(logprobs["top_logprobs"], expected.token_ids, expected.logprobs):
        assert alternatives == pytest.approx({**{texts(i)[0]: v for i, v in top}, texts(token)[0]: logprob}, **TOL)
    lengths = [len(t) for t in logprobs["tokens"]]
    assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_echo_with_zero_max_tokens_scores_the_prompt_under_the_expert(oai, local_engine, stream):
    prompt_ids = local_engine.encode(GenerationRequest(prompt=PROMPT))
    call = dict(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, extra_body={"rule": "token"})
    if stream:
        chunks = list(oai.completions.create(stream=True, **call))
        text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
        (logprobs,) = [choice.logprobs for chunk in chunks for choice in chunk.choices if choice.logprobs]
        usage = None
    else:
        response = oai.completions.create(**call)
        (choice,) = response.choices
        text, logprobs, usage = choice.text, choice.logprobs, response.usage
        assert choice.finish_reason == "length"
    assert text == PROMPT
    texts = TokenTexts(local_engine.tokenizer)
    assert logprobs.tokens == [texts(t)[0] for t in prompt_ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(expert_prompt_logprobs(local_engine, prompt_ids),
                                                       abs=2e-4, rel=2e-4)  # one full pass here
    assert all(len(top) in (1, 2) for top in logprobs.top_logprobs[1:])
    if usage is not None:
        assert usage.completion_tokens == 0 and usage.prompt_tokens == len(prompt_ids)


def post_completion(openai_base_url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{openai_base_url}/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.mark.parametrize("tokenized", [False, True], ids=["text", "token-ids"])
def test_lm_evaluation_harness_loglikelihood_and_generation_bodies(openai_base_url, local_engine, tokenized):
    """The bodies lm-eval 0.4.13's `local-completions` sends (a batch of one prompt: text with
    tokenized_requests=False, token ids by default), parsed as it parses them (`parse_logprobs`:
    the continuation's token_logprobs, and is_greedy from top_logprobs)."""
    context, continuation = "def add(a, b):", " return a + b"
    ids = local_engine.encode(GenerationRequest(prompt=context + continuation))
    ctxlen = len(local_engine.encode(GenerationRequest(prompt=context)))
    prompt = [ids] if tokenized else [context + continuation]
    loglikelihood = post_completion(openai_base_url, {"model": MODEL, "prompt": prompt, "temperature": 0,
                                                      "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
    (choice,) = loglikelihood["choices"]
    assert choice["text"].startswith(context + continuation)  # token ids are echoed as their text
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1  # the prompt's and one generated
    assert loglikelihood["usage"]["prompt_tokens"] == len(ids)
    continuation_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    assert sum(continuation_logprobs) == pytest.approx(sum(expert_prompt_logprobs(local_engine, ids)[ctxlen - 1:]),
                                                       abs=2e-3)
    for logprob, top in zip(continuation_logprobs, choice["logprobs"]["top_logprobs"][ctxlen:-1]):
        assert logprob <= max(top.values())
    context_prompt = [local_engine.encode(GenerationRequest(prompt=context))] if tokenized else [context]
    generation = post_completion(openai_base_url, {"model": MODEL, "prompt": context_prompt, "max_tokens": 16,
                                                   "temperature": 0, "stop": ["\n\n"], "seed": 1234})
    expected = in_process(local_engine, k=None, prompt=context, rule="lossless", max_new_tokens=16, stop=("\n\n",),
                          seed=1234)
    assert generation["choices"][0]["text"] == expected.text


@pytest.mark.parametrize("prompt,fragment", [
    ([[1, 2], [3, 4]], "a list of 2 prompts; this server takes one prompt per request"),
    ([1, 10**9], "prompt_token_ids[1]=1000000000 is outside the vocabulary"),
    ([1, -1], "prompt_token_ids[1]=-1 is not a token id"),
])
def test_bad_token_id_prompts_are_400s_naming_the_prompt(openai_base_url, prompt, fragment):
    with pytest.raises(urllib.error.HTTPError) as error:
        post_completion(openai_base_url, {"model": MODEL, "prompt": prompt, "max_tokens": 4})
    assert error.value.code == 400
    body = json.load(error.value)["error"]
    assert body["param"] == "prompt" and fragment in body["message"]


@pytest.mark.parametrize("path,body,param", [
    ("chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("completions", {"prompt": PROMPT, "logprobs": 6}, "logprobs"),
    ("completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
])
def test_bad_logprobs_requests_are_400s_naming_the_field(openai_base_url, path, body, param):
    request = urllib.request.Request(f"{openai_base_url}/{path}", data=json.dumps({"model": MODEL, **body}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code == 400
    assert json.load(error.value)["error"]["param"] == param


@pytest.mark.parametrize("stream", [False, True], ids=["Generate", "GenerateStream"])
def test_grpc_logprobs_are_the_in_process_engines(client, local_engine, stream):
    """lossy, sampled (its output distribution blends q and p), with the prompt's logprobs."""
    expected = in_process(local_engine, k=4, prompt_logprobs=2, rule="lossy", alpha=0.3, max_new_tokens=16, seed=9,
                          sampling=SAMPLED)
    message = build_request(prompt=PROMPT, rule="lossy", alpha=0.3, max_new_tokens=16, seed=9, logprobs=4,
                           prompt_logprobs=2, **SAMPLED)
    if stream:
        chunks = list(client.stream(message))
        token_ids = [t for chunk in chunks for t in chunk.token_ids]
        logprobs = [entry for chunk in chunks for entry in chunk.logprobs]
        prompt_logprobs = list(chunks[0].prompt_logprobs)
        assert all(not chunk.prompt_logprobs for chunk in chunks[1:])
    else:
        response = client.generate(message)
        token_ids, logprobs, prompt_logprobs = list(response.token_ids), list(response.logprobs), \
            list(response.prompt_logprobs)
    assert token_ids == expected.token_ids
    assert [e.token_id for e in logprobs] == expected.token_ids
    assert [e.logprob for e in logprobs] == pytest.approx([lp for lp, _ in expected.logprobs], **TOL)
    assert [[t.token_id for t in e.top] for e in logprobs] == [[i for i, _ in top] for _, top in expected.logprobs]
    prompt_ids = local_engine.encode(GenerationRequest(prompt=PROMPT))
    assert [e.token_id for e in prompt_logprobs] == prompt_ids
    assert not prompt_logprobs[0].HasField("logprob") and not prompt_logprobs[0].top
    assert [e.logprob for e in prompt_logprobs[1:]] == pytest.approx(
        [lp for lp, _ in expected.prompt_logprobs[1:]], **TOL)
    assert all(len(e.top) == 2 for e in prompt_logprobs[1:])


def test_grpc_prompt_only_and_bad_logprobs(client, local_engine):
    response = client.generate(build_request(prompt=PROMPT, max_new_tokens=0, prompt_logprobs=0))
    prompt_ids = local_engine.encode(GenerationRequest(prompt=PROMPT))
    assert not response.token_ids and response.usage.completion_tokens == 0
    assert [e.logprob for e in response.prompt_logprobs[1:]] == pytest.approx(
        expert_prompt_logprobs(local_engine, prompt_ids), abs=2e-4, rel=2e-4)
    import grpc

    for fields, name in ((dict(logprobs=21), "logprobs"), (dict(max_new_tokens=0), "max_new_tokens")):
        with pytest.raises(grpc.RpcError) as error:
            client.generate(build_request(prompt=PROMPT, **fields))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(f"{name}=")
