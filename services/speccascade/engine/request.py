"""A generation request, validated where it enters the system."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from ..options import (
    CHAT_ROLES,
    DEFAULT_ALPHA,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PIPELINE,
    DEFAULT_RULE,
    MAX_BLOCK_SIZE,
    MAX_NEW_TOKENS_CAP,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    Method,
    Pipeline,
    Rule,
    SamplingParams,
    validate_alpha,
)


def _check_messages(messages: list[dict]) -> tuple[dict, ...]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise ValueError(f"messages[{i}] must be a dict with keys 'role' and 'content', got {message!r}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role={role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in checked):
        raise ValueError("messages are all empty: the prompt must contain some text")
    return tuple(checked)


def _check_token_ids(ids) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"prompt_token_ids must be a list of token ids, got {ids!r}")
    ids = tuple(ids)
    if not ids:
        raise ValueError("prompt_token_ids must hold at least one token id, got []")
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"prompt_token_ids[{i}]={token!r} is not a token id (an integer >= 0)")
    return ids


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None  # a prompt already tokenized, taken as is (no BOS added)
    method: Method = Method.CASCADE
    rule: Rule = DEFAULT_RULE
    alpha: float = DEFAULT_ALPHA
    block_size: int = DEFAULT_BLOCK_SIZE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    pipeline: Pipeline = DEFAULT_PIPELINE
    # vLLM's extensions, with vLLM's meaning. ignore_eos: an end-of-sequence token does not end
    # the output (it is kept, and counted, as an output token); only max_new_tokens or a stop
    # string does. min_tokens: no end-of-sequence token is drawn (both models' distributions mask
    # it) and no stop string ends the output before that many tokens. skip_special_tokens: leave
    # special tokens out of the text (the token ids keep them).
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    # logprobs (k in 0..MAX_TOP_LOGPROBS): each output token's log-probability under the
    # distribution it was output from, with that position's k most likely tokens (which
    # distribution: `cascade.logprobs`). prompt_logprobs (k): the prompt's tokens' under the
    # expert, the first one having none; with it, max_new_tokens may be 0 (score the prompt only).
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if sum(given is not None for given in (self.prompt, self.messages, self.prompt_token_ids)) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
        if self.prompt is not None:
            if not isinstance(self.prompt, str) or not self.prompt.strip():
                raise ValueError(f"prompt must be non-empty text, got {self.prompt!r}")
        elif self.messages is not None:
            set_("messages", _check_messages(self.messages))
        else:
            set_("prompt_token_ids", _check_token_ids(self.prompt_token_ids))
        set_("method", Method.parse(self.method))
        set_("pipeline", Pipeline.parse(self.pipeline))
        set_("rule", Rule.parse(self.rule))
        # The classic cascades defer when confidence < 1 - alpha, the same knob as chow.
        alpha_rule = self.rule if self.method is Method.CASCADE else Rule.CHOW
        set_("alpha", validate_alpha(alpha_rule, self.alpha))
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size must be an integer, got {self.block_size!r}")
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size={self.block_size} is out of range: expected 1..{MAX_BLOCK_SIZE}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS):
                raise ValueError(f"{name}={k!r} is out of range: expected an integer 0..{MAX_TOP_LOGPROBS} (the "
                                 "alternatives listed per token), or unset")
        lowest = 0 if self.prompt_logprobs is not None else 1  # 0: only the prompt is scored
        if not lowest <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} is out of range: expected {lowest}..{MAX_NEW_TOKENS_CAP}"
                + (" (0 only with prompt logprobs)" if lowest else "")
            )
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(f"sampling must be SamplingParams, got {type(self.sampling).__name__}")
        if self.seed is None:
            set_("seed", secrets.randbits(63))
        elif isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty text, got {s!r}")
        set_("stop", stop)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int):
            raise ValueError(f"min_tokens must be an integer, got {self.min_tokens!r}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is out of range: expected 0..max_new_tokens "
                             f"({self.max_new_tokens})")
