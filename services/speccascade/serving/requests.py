"""From whatever protocol carried a request to the engine's `GenerationRequest`, under a policy
(the server's, or a tenant's): unset fields take the policy's defaults and the result obeys its
limits. Every protocol front-end goes through this one function, so a request is refused with the
same message, naming the field, whichever way it came."""

from __future__ import annotations

from ..config.app import CascadePolicy
from ..engine.request import GenerationRequest
from ..options import Method, Pipeline, Rule, SamplingParams


def request_with_policy(
    policy: CascadePolicy, *, prompt: str | None = None, messages: list[dict] | None = None,
    prompt_token_ids: list[int] | None = None,
    method: Method | str = Method.CASCADE, rule: Rule | str | None = None, alpha: float | None = None,
    block_size: int | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
    top_k: int | None = None, top_p: float | None = None, seed: int | None = None, stop: tuple[str, ...] = (),
    pipeline: Pipeline | str | None = None, ignore_eos: bool | None = None, min_tokens: int | None = None,
    skip_special_tokens: bool | None = None, logprobs: int | None = None, prompt_logprobs: int | None = None,
) -> GenerationRequest:
    """A request from whatever protocol carried it: unset (None) fields take the server's defaults,
    and the result obeys the server's limits. ValueError names the bad field; every protocol
    (the gRPC and the OpenAI front-ends) goes through this one function."""
    max_new_tokens = policy.max_new_tokens if max_new_tokens is None else max_new_tokens
    if isinstance(max_new_tokens, int) and max_new_tokens > policy.max_new_tokens_cap:
        raise ValueError(f"max_new_tokens={max_new_tokens} is above this server's cap of "
                         f"{policy.max_new_tokens_cap}")
    params = SamplingParams(
        temperature=0.0 if temperature is None else temperature,
        top_k=0 if top_k is None else top_k,
        top_p=1.0 if top_p is None else top_p,
    )
    return GenerationRequest(
        prompt=prompt, messages=messages, prompt_token_ids=prompt_token_ids, method=method, rule=policy.rule if rule is None else rule,
        alpha=policy.alpha if alpha is None else alpha,
        block_size=policy.block_size if block_size is None else block_size,
        max_new_tokens=max_new_tokens, sampling=params, seed=seed, stop=stop,
        pipeline=policy.pipeline if pipeline is None else pipeline,
        ignore_eos=False if ignore_eos is None else ignore_eos, min_tokens=0 if min_tokens is None else min_tokens,
        skip_special_tokens=True if skip_special_tokens is None else skip_special_tokens,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs,
    )
