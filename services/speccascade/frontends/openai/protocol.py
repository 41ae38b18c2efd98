"""The OpenAI API's shapes: request bodies (with speccascade's extension fields), their first
validation, and the error object. `mapping.py` turns them into the engine's request and the
engine's output into responses; `api_router.py` serves them over HTTP.

Requests are validated in two steps, both naming the bad field: the body's shape here (types,
unknown fields, OpenAI features this server does not implement), then the very checks a gRPC
request goes through (`serving.requests.request_with_policy`, `GenerationRequest`). The cascade
policy and method are extra body fields, which OpenAI clients send through `extra_body`:

    method      cascade (default), expert, drafter, token-cascade, sequence-cascade
    rule        lossless, chow, diff, opt, token, lossy (default: the server's)
    alpha       the rule's trade-off knob (range depends on the rule)
    block_size  tokens drafted per round (gamma; the first round drafts one)
    top_k       top-k sampling (0 disables it)
    pipeline    on, off or auto: draft the next block while the expert verifies (same output)
    resume_token  continue a stream that broke off: the `resume_token` of the last event received,
                with the request otherwise the same (the output goes on token-identically)

vLLM's extension fields, which load testers and evaluation harnesses send (guidellm, `vllm bench
serve`), are honoured with vLLM's meaning:

    ignore_eos           the end-of-sequence token does not end the output (it is kept as a token)
    min_tokens           no end-of-sequence token and no stop string before this many tokens
    skip_special_tokens  leave special tokens out of the text (default true)
    stream_options.continuous_usage_stats   cumulative usage in every streamed chunk
    repetition_penalty   only 1.0 (no penalty): see UNSUPPORTED_REASONS

OpenAI's log-probabilities: chat's `logprobs` / `top_logprobs` (0..20), completions' `logprobs`
(0..5) and `echo` (the prompt before the completion; with logprobs, the prompt tokens' under the
expert, the first one null, as vLLM gives them; `max_tokens: 0` then scores the prompt only, which
is how evaluation harnesses compute log-likelihoods). Which distribution each number is from:
`speccascade.cascade.logprobs`.

Unset fields take the server's defaults, as over gRPC; in particular an unset `temperature` means
greedy decoding (OpenAI's own default is 1). Responses carry OpenAI's fields plus, per choice,
`segments` (the text by the model that produced it: provenance), and a top-level `speccascade`
object with the policy used, the seed and the request's decoding stats.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from ...config.base import StrictModel
from ...options import MAX_TOP_LOGPROBS

SERVED_MODEL = "speccascade"
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's legacy completions API: at most 5 alternatives per token
EXTRA_FIELDS = ("method", "rule", "alpha", "block_size", "top_k", "pipeline", "ignore_eos", "min_tokens",
                "skip_special_tokens", "repetition_penalty", "resume_token")


class OpenAIError(ValueError):
    """An error answered as HTTP `status` with OpenAI's error object. A ValueError: raised while
    the router admits a request, it is counted as a bad request like the engine's own."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------ request bodies

class RequestBody(StrictModel):
    """Fields both endpoints share. Unknown fields are refused (a misspelt extra field would
    otherwise be dropped silently, and the request decoded under another policy)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: "StreamOptions | None" = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = Field(None, description="Accepted for compatibility; not used.")
    # speccascade's extra fields (see the module docstring)
    method: str | None = None
    rule: str | None = None
    alpha: float | None = None
    block_size: int | None = None
    top_k: int | None = None
    pipeline: str | None = None
    resume_token: str | None = None
    # vLLM's extra fields (see the module docstring)
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    repetition_penalty: float | None = None
    # OpenAI features this server does not implement: accepted only at their neutral value.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class StreamOptions(StrictModel):
    include_usage: bool = False  # a last chunk with the whole request's usage
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


class CompletionBody(RequestBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # 0..MAX_COMPLETION_LOGPROBS alternatives per token (the legacy shape)
    echo: bool | None = None  # the prompt before the completion; with logprobs, the prompt's too
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(StrictModel):
    role: str
    content: str | list[dict[str, Any]] | None
    name: str | None = None


class ChatCompletionBody(RequestBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None  # 0..MAX_TOP_LOGPROBS alternatives per token, with logprobs: true
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


RequestBody.model_rebuild()
CompletionBody.model_rebuild()
ChatCompletionBody.model_rebuild()

# Unsupported fields and the values that mean "not used", which are accepted.
NEUTRAL_VALUES: dict[str, tuple] = {
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "repetition_penalty": (None, 1, 1.0),
}

# Why an unsupported field cannot be honoured, where the reason is not simply "not implemented".
UNSUPPORTED_REASONS = {
    "repetition_penalty": (
        "vLLM's repetition penalty rescales a seen token's raw logit by its sign (divides a positive "
        "logit, multiplies a negative one), and the cascade's tiers decide on probability "
        "distributions, where that sign is lost (a row's logits are known only up to a shift), so "
        "the penalty cannot be applied to the drafter's and the expert's distributions exactly; "
        "1.0 (no penalty) is accepted"),
}


def validate_shape(raw: object, body_type: type[StrictModel], *, known_extras: tuple[str, ...] = ()):
    """A decoded JSON body as `body_type`; OpenAIError(400) names the first bad field (an unknown
    field too, with the extra fields this server takes besides the API's own)."""
    if not isinstance(raw, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(raw).__name__}")
    try:
        return body_type.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"unknown field {param!r}" + (
                f"; besides OpenAI's fields this server takes {', '.join(known_extras)}" if known_extras else "")
        elif first["type"] == "missing":
            message = f"{param} is required"
        else:
            message = f"{param}: {first['msg']} (got {first.get('input')!r})"
        raise OpenAIError(400, message, param=param) from None


def parse_body(raw: object, body_type: type[RequestBody]) -> RequestBody:
    """Validate a decoded JSON body; OpenAIError(400) names the first bad field."""
    body = validate_shape(raw, body_type, known_extras=EXTRA_FIELDS)
    for name, neutral in NEUTRAL_VALUES.items():
        value = getattr(body, name, None)
        if value not in neutral:
            reason = UNSUPPORTED_REASONS.get(name)
            raise OpenAIError(400, f"{name}={value!r} is not supported by this server"
                                   + (f": {reason}" if reason else ""), param=name, code="unsupported_parameter")
    if body.n is not None and body.n != 1:
        raise OpenAIError(400, f"n={body.n} is not supported: this server returns one choice per request "
                               "(send n requests, with different seeds, for n samples)", param="n",
                          code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    _check_logprobs(body)
    return body


def _check_logprobs(body: RequestBody) -> None:
    """OpenAI's logprobs fields: on chat, `logprobs: true` with `top_logprobs` 0..20 alternatives per
    token; on completions, `logprobs` 0..5 alternatives (and `echo` adds the prompt's)."""
    if isinstance(body, ChatCompletionBody):
        k = body.top_logprobs
        if k is not None and not body.logprobs:
            raise OpenAIError(400, f"top_logprobs={k} needs logprobs: true", param="top_logprobs")
        if k is not None and (isinstance(k, bool) or not 0 <= k <= MAX_TOP_LOGPROBS):
            raise OpenAIError(400, f"top_logprobs={k!r} is out of range: expected 0..{MAX_TOP_LOGPROBS}",
                              param="top_logprobs")
    elif isinstance(body, CompletionBody):
        k = body.logprobs
        if k is not None and not 0 <= k <= MAX_COMPLETION_LOGPROBS:
            raise OpenAIError(400, f"logprobs={k!r} is out of range: expected 0..{MAX_COMPLETION_LOGPROBS} on "
                                   f"completions (the most likely alternatives per token; chat's top_logprobs "
                                   f"goes to {MAX_TOP_LOGPROBS})", param="logprobs")
