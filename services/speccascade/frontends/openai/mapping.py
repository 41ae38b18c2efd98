"""Between the OpenAI API's shapes (`protocol.py`) and the engine's types, as `grpc/convert.py` is
for protobuf: a parsed body to the engine's request under the caller's policy, and the core's
chunks to completions, chat completions and their server-sent-event chunks. No HTTP here.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ...config.app import CascadePolicy
from ...engine.generation import GenerationChunk, GenerationResult
from ...engine.request import GenerationRequest
from ...engine.text import Segment
from ...options import Method
from ...serving.clients import Transport
from ...serving.requests import request_with_policy
from .logprobs import ChoiceExtras, TokenTexts
from .protocol import SERVED_MODEL, ChatCompletionBody, ChatMessage, CompletionBody, OpenAIError, RequestBody

# OpenAI's `developer` role is its newer name for `system` (instructions to the model).
ROLE_ALIASES = {"developer": "system"}


# ----------------------------------------------------------------------------- to the engine's request

# Which request field a validation message is about: the engine's messages name it first.
_PARAM_OF_MESSAGE = [
    (re.compile(r"^(policy\.)?alpha\b"), "alpha"), (re.compile(r"^(unknown rule|policy\.rule)\b"), "rule"),
    (re.compile(r"^(unknown method|policy\.method)\b"), "method"), (re.compile(r"^block_size\b"), "block_size"),
    (re.compile(r"^max_new_tokens\b"), "max_tokens"), (re.compile(r"^temperature\b"), "temperature"),
    (re.compile(r"^top_k\b"), "top_k"), (re.compile(r"^top_p\b"), "top_p"), (re.compile(r"^seed\b"), "seed"),
    (re.compile(r"^(at most \d+ )?stop\b"), "stop"), (re.compile(r"^messages\b"), "messages"),
    (re.compile(r"^prompt(_token_ids)?\b"), "prompt"), (re.compile(r"^(unknown pipeline|policy\.pipeline)\b"), "pipeline"),
    (re.compile(r"^min_tokens\b"), "min_tokens"), (re.compile(r"^ignore_eos\b"), "ignore_eos"),
    (re.compile(r"^skip_special_tokens\b"), "skip_special_tokens"),
    (re.compile(r"^resume_token\b"), "resume_token"),
]


def param_of(message: str, *, chat: bool) -> str | None:
    for pattern, param in _PARAM_OF_MESSAGE:
        if pattern.match(message):
            return "messages" if chat and param == "prompt" else param
    return None


def invalid_request(error: ValueError, *, chat: bool) -> OpenAIError:
    message = str(error)
    param = param_of(message, chat=chat)
    if param in ("max_tokens", "min_tokens"):  # max_new_tokens is the engine's name for max_tokens
        message = message.replace("max_new_tokens", "max_tokens")
    code = "context_length_exceeded" if "is too long" in message else None
    return OpenAIError(400, message, param=param, code=code)


def _one_prompt(prompt: str | list) -> str | list[int]:
    """The one prompt of a completions request: text, or token ids (OpenAI's four shapes: a string,
    token ids, or a list holding one of either)."""
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise OpenAIError(400, "prompt must be non-empty text or token ids, got []", param="prompt")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return list(prompt)
    if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        return _one_prompt(prompt[0])
    if all(isinstance(p, (str, list)) for p in prompt):
        raise OpenAIError(400, f"prompt is a list of {len(prompt)} prompts; this server takes one prompt "
                               "per request", param="prompt", code="unsupported_parameter")
    raise OpenAIError(400, "prompt must be text, token ids, or a list holding one of them", param="prompt")


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict]:
    """OpenAI chat messages as the engine takes them: roles by their engine names, text parts joined."""
    return [{"role": ROLE_ALIASES.get(m.role, m.role), "content": _message_content(i, m.content)}
            for i, m in enumerate(messages)]


def _message_content(index: int, content: str | list[dict] | None) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise OpenAIError(400, f"messages[{index}].content is required", param="messages")
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise OpenAIError(400, f"messages[{index}].content: only text parts are supported, got {part!r}",
                              param="messages", code="unsupported_parameter")
        texts.append(part["text"])
    return "".join(texts)


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def generation_request(body: RequestBody, policy: CascadePolicy) -> GenerationRequest:
    """The engine's request for a parsed body, with the server's defaults and limits
    (OpenAIError(400) names the bad field, in OpenAI's naming)."""
    chat = isinstance(body, ChatCompletionBody)
    max_tokens = body.max_tokens
    if chat and body.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != body.max_completion_tokens:
            raise OpenAIError(400, f"max_tokens={max_tokens} and max_completion_tokens="
                                   f"{body.max_completion_tokens} disagree; give one", param="max_completion_tokens")
        max_tokens = body.max_completion_tokens
    prompt_token_ids = None
    if chat:
        prompt = None
        messages = chat_messages(body.messages)
    else:
        prompt, messages = _one_prompt(body.prompt), None
        if isinstance(prompt, list):
            prompt_token_ids, prompt = prompt, None
    logprobs, prompt_logprobs = logprobs_asked(body)
    if max_tokens == 0 and prompt_logprobs is None:
        raise OpenAIError(400, "max_tokens=0 generates nothing: it is only allowed on completions with echo and "
                               "logprobs (the prompt's log-probabilities)", param="max_tokens")
    try:
        return request_with_policy(
            policy, prompt=prompt, messages=messages, prompt_token_ids=prompt_token_ids,
            method=Method.CASCADE if body.method is None else body.method,
            rule=body.rule, alpha=body.alpha, block_size=body.block_size, max_new_tokens=max_tokens,
            temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed,
            stop=_stop(body.stop), pipeline=body.pipeline, ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
            skip_special_tokens=body.skip_special_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )
    except ValueError as error:
        raise invalid_request(error, chat=chat) from None


def logprobs_asked(body: RequestBody) -> tuple[int | None, int | None]:
    """(logprobs, prompt_logprobs) for the engine: the alternatives per token, or None when not
    asked for. Chat: `logprobs: true` with `top_logprobs` (default 0); completions: `logprobs`, and
    with `echo` the prompt's as well."""
    if isinstance(body, ChatCompletionBody):
        return ((body.top_logprobs or 0) if body.logprobs else None), None
    k = getattr(body, "logprobs", None)
    return k, (k if k is not None and getattr(body, "echo", None) else None)


def check_model(requested: str, served: str = SERVED_MODEL) -> None:
    if requested != served:
        raise OpenAIError(404, f"the model {requested!r} does not exist; this server serves {served!r}",
                          param="model", code="model_not_found")


# ------------------------------------------------------------------------------------------ responses

def segments_json(segments: list[Segment]) -> list[dict]:
    return [{"text": s.text, "source": s.source.value} for s in segments]


def merged_segments(segments: list[Segment]) -> list[Segment]:
    """Adjacent pieces from the same model as one segment (a whole response's provenance)."""
    merged: list[Segment] = []
    for segment in segments:
        if merged and merged[-1].source is segment.source:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.source)
        elif segment.text:
            merged.append(segment)
    return merged


def usage_json(result: GenerationResult) -> dict:
    return token_usage_json(result.prompt_tokens, len(result.token_ids))


def token_usage_json(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class RunningUsage:
    """A stream's usage so far, for vLLM's `stream_options.continuous_usage_stats`: every chunk
    carries the prompt's tokens and the output tokens produced up to and including that chunk
    (tokens whose text is held back, or has none, count as soon as they are produced); the chunks
    of the last round carry the request's final usage."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def json(self) -> dict:
        return token_usage_json(self.prompt_tokens, self.completion_tokens)

    def add(self, chunk: GenerationChunk) -> dict:
        if chunk.result is not None:
            self.completion_tokens = len(chunk.result.token_ids)
        else:
            self.completion_tokens += len(chunk.token_ids)
        return self.json()


def speccascade_json(result: GenerationResult, request: GenerationRequest, transport: Transport) -> dict:
    """The extension object: what decoded the request, and how it went."""
    policy: dict = {"method": request.method.value}
    if request.method is Method.CASCADE:
        policy.update(rule=request.rule.value, alpha=request.alpha, block_size=request.block_size,
                      pipeline=request.pipeline.value)
    elif request.method in (Method.TOKEN_CASCADE, Method.SEQUENCE_CASCADE):
        policy.update(alpha=request.alpha)
    return {"policy": policy, "seed": result.seed, "expert_only_fallback": transport.expert_only_fallback,
            "tier_retries": transport.tier_retries, "context_resends": transport.context_resends,
            "stats": result.stats.as_dict()}


# ----------------------------------------------------------------------------------- logprobs, echo

def choice_extras(body: RequestBody, prompt_ids: Sequence[int], texts: TokenTexts) -> "ChoiceExtras | None":
    """The request's echo and logprobs, or None when it asks for neither."""
    logprobs, _ = logprobs_asked(body)
    echo = None
    if isinstance(body, CompletionBody) and body.echo:  # token ids are echoed as their text
        prompt = _one_prompt(body.prompt)
        echo = prompt if isinstance(prompt, str) else texts.tokenizer.decode(prompt)
    if logprobs is None and echo is None:
        return None
    kind = "chat" if isinstance(body, ChatCompletionBody) else "completion"
    return ChoiceExtras(kind, texts, logprobs=logprobs is not None, echo=echo, prompt_ids=prompt_ids)


@dataclass(frozen=True)
class Reply:
    """One response's identity: the same id, timestamp and model on every chunk; `extras`: its echo
    and logprobs, if the request asked for them."""

    kind: Literal["completion", "chat"]
    id: str
    created: int
    model: str
    extras: ChoiceExtras | None = None

    @classmethod
    def new(cls, kind: Literal["completion", "chat"], model: str = SERVED_MODEL,
            extras: ChoiceExtras | None = None) -> "Reply":
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return cls(kind, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, extras)

    def _envelope(self, object_: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model, "choices": choices}

    # ---- non-streamed ----

    def response(self, result: GenerationResult, segments: list[Segment], request: GenerationRequest,
                 transport: Transport) -> dict:
        extras = self.extras
        choice: dict = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None,
                        "segments": segments_json(merged_segments(segments))}
        if extras is not None:
            choice["logprobs"] = extras.choice_logprobs(result.token_ids, result.logprobs, result.prompt_logprobs)
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": result.text}
            out = self._envelope("chat.completion", [choice])
        else:
            choice["text"] = (extras.echo() if extras is not None else "") + result.text
            out = self._envelope("text_completion", [choice])
        out["usage"] = usage_json(result)
        out["speccascade"] = speccascade_json(result, request, transport)
        return out

    # ---- streamed (server-sent events) ----

    def _chunk(self, text: str | None, segments: list[Segment], *, role: bool = False,
               finish_reason: str | None = None, usage: dict | None = None, logprobs: dict | None = None) -> dict:
        choice: dict = {"index": 0, "finish_reason": finish_reason, "logprobs": logprobs,
                        "segments": segments_json(segments)}
        if self.kind == "chat":
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
            out = self._envelope("chat.completion.chunk", [choice])
        else:
            choice["text"] = text or ""
            out = self._envelope("text_completion", [choice])
        if usage is not None:
            out["usage"] = usage
        return out

    def first_chunks(self, usage: dict | None = None) -> list[dict]:
        """A chat stream opens with the assistant's role (OpenAI's first chunk); `usage`: the
        running usage (no output yet) when every chunk carries it."""
        return [self._chunk("", [], role=True, usage=usage)] if self.kind == "chat" else []

    def chunks(self, chunk: GenerationChunk, request: GenerationRequest, transport: Transport,
               *, include_usage: bool, usage: dict | None = None) -> list[dict]:
        """The events for one generation chunk: its text with provenance; after the last, the
        finish reason with the `speccascade` object, and the usage when asked for. `usage`: the
        running usage up to this chunk, put in each of its events (continuous usage stats)."""
        text, logprobs, extras = chunk.text, None, self.extras
        if extras is not None:  # the echoed prompt opens the first event; logprobs go with their tokens
            text = extras.echo() + text
            if chunk.token_ids or chunk.prompt_logprobs:
                logprobs = extras.choice_logprobs(chunk.token_ids, chunk.logprobs, chunk.prompt_logprobs)
        events = [self._chunk(text, chunk.segments, usage=usage, logprobs=logprobs)] if text or logprobs else []
        result = chunk.result
        if result is None:
            return events
        final = self._chunk(None if self.kind == "chat" else "", [], finish_reason=result.finish_reason, usage=usage)
        final["speccascade"] = speccascade_json(result, request, transport)
        events.append(final)
        if include_usage:
            events.append({**self._envelope(final["object"], []), "usage": usage_json(result)})
        return events


def models_json(drafter: str, expert: str, created: int, model: str = SERVED_MODEL) -> dict:
    return {"object": "list", "data": [model_json(drafter, expert, created, model)]}


def model_json(drafter: str, expert: str, created: int, model: str = SERVED_MODEL) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "speccascade",
            "drafter": drafter, "expert": expert}
