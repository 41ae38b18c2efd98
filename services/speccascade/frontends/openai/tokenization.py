"""vLLM's tokenizer routes, with vLLM's shapes: `POST /tokenize`, `POST /detokenize`, `GET
/tokenizer_info`. Evaluation harnesses use them to count and split tokens with the served pair's
own tokenizer: lm-evaluation-harness's `local-completions` looks for them and, when they answer,
needs no tokenizer of its own. A chat's messages are tokenized exactly as the chat endpoint
tokenizes them (the pair's chat template), so `count` is the prompt a chat request would send.
"""

from __future__ import annotations

from ...config.base import StrictModel
from ...engine.prompt import check_vocabulary, encode_prompt
from ...engine.request import GenerationRequest
from .mapping import chat_messages, check_model
from .protocol import ChatMessage, OpenAIError, validate_shape


class TokenizeBody(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # vLLM's default: true for a prompt, false for messages
    return_token_strs: bool = False


class DetokenizeBody(StrictModel):
    model: str | None = None
    tokens: list[int]


def tokenize_json(tokenizer, raw: object, context_window: int) -> dict:
    body = validate_shape(raw, TokenizeBody)
    if body.model is not None:
        check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise OpenAIError(400, "give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        if body.add_special_tokens:
            raise OpenAIError(400, "add_special_tokens=true is not supported with messages: they are tokenized "
                                   "as the chat endpoint tokenizes them (the chat template adds what it needs)",
                              param="add_special_tokens")
        try:
            tokens = encode_prompt(tokenizer, GenerationRequest(messages=chat_messages(body.messages)))
        except ValueError as error:
            raise OpenAIError(400, str(error), param="messages") from None
    else:
        add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = list(tokenizer(body.prompt, add_special_tokens=add_special_tokens)["input_ids"])
    return {"count": len(tokens), "max_model_len": context_window, "tokens": tokens,
            "token_strs": tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None}


def detokenize_json(tokenizer, raw: object) -> dict:
    body = validate_shape(raw, DetokenizeBody)
    if body.model is not None:
        check_model(body.model)
    try:
        check_vocabulary(tokenizer, body.tokens, "tokens")
    except ValueError as error:
        raise OpenAIError(400, str(error), param="tokens") from None
    return {"prompt": tokenizer.decode(body.tokens)}


def tokenizer_info_json(tokenizer, context_window: int) -> dict:
    """What vLLM's /tokenizer_info gives that clients read: the special tokens, the chat template,
    the context window (`model_max_length`)."""
    return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
            "chat_template": tokenizer.chat_template, "model_max_length": context_window,
            "vocab_size": len(tokenizer)}
