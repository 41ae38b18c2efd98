"""vLLM's tokenizer routes' bodies and answers (`frontends.openai.tokenization`), with the tiny
pair's tokenizer; served through HTTP with lm-eval in test_lm_eval.py and in test_openai.py."""

from __future__ import annotations

import pytest
from speccascade.engine.prompt import encode_prompt
from speccascade.engine.request import GenerationRequest
from speccascade.frontends.openai.protocol import OpenAIError
from speccascade.frontends.openai.tokenization import detokenize_json, tokenize_json, tokenizer_info_json

WINDOW = 512


def test_a_prompt_is_tokenized_as_the_tokenizer_does_with_or_without_special_tokens(tokenizer):
    text = "def add(a, b):\n    return a + b"
    answer = tokenize_json(tokenizer, {"prompt": text, "add_special_tokens": False, "return_token_strs": True},
                           WINDOW)
    assert answer["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == WINDOW
    assert answer["token_strs"] == tokenizer.convert_ids_to_tokens(answer["tokens"])
    assert tokenize_json(tokenizer, {"prompt": text}, WINDOW)["tokens"] == tokenizer(text)["input_ids"]
    assert detokenize_json(tokenizer, {"tokens": answer["tokens"], "model": "speccascade"}) == {"prompt": text}


def test_messages_count_what_the_chat_endpoint_would_send(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]}]
    answer = tokenize_json(tokenizer, {"messages": messages}, WINDOW)
    expected = encode_prompt(tokenizer, GenerationRequest(messages=[messages[0], {"role": "user",
                                                                                  "content": "Say hi"}]))
    assert answer["tokens"] == expected and answer["token_strs"] is None


def test_tokenizer_info_has_what_lm_eval_reads(tokenizer):
    info = tokenizer_info_json(tokenizer, WINDOW)
    assert info["eos_token"] == tokenizer.eos_token and info["model_max_length"] == WINDOW
    assert info["chat_template"] == tokenizer.chat_template and info["vocab_size"] == len(tokenizer)


@pytest.mark.parametrize("route,body,param,fragment", [
    ("tokenize", {}, "prompt", "give exactly one of prompt or messages"),
    ("tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt", "exactly one"),
    ("tokenize", {"prompt": "a", "model": "gpt-4"}, "model", "does not exist"),
    ("tokenize", {"prompt": 5}, "prompt", "prompt:"),
    ("tokenize", {"prompt": "a", "truncate": 3}, "truncate", "unknown field 'truncate'"),
    ("tokenize", {"messages": [{"role": "robot", "content": "b"}]}, "messages", "messages[0].role='robot'"),
    ("tokenize", {"messages": [{"role": "user", "content": "b"}], "add_special_tokens": True},
     "add_special_tokens", "not supported with messages"),
    ("detokenize", {"tokens": [1, -1]}, "tokens", "tokens[1]=-1 is outside the vocabulary"),
    ("detokenize", {"tokens": [10**9]}, "tokens", "tokens[0]=1000000000 is outside the vocabulary"),
    ("detokenize", {}, "tokens", "tokens is required"),
    ("detokenize", [1, 2], None, "must be a JSON object"),
])
def test_bad_bodies_are_400s_naming_the_field(tokenizer, route, body, param, fragment):
    with pytest.raises(OpenAIError) as error:
        tokenize_json(tokenizer, body, WINDOW) if route == "tokenize" else detokenize_json(tokenizer, body)
    assert error.value.status in (400, 404) and error.value.param == param and fragment in error.value.message
