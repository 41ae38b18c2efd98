"""Between the public protobuf messages and the engine's types. Validation stays where it is
(`GenerationRequest`, `SamplingParams`), so a bad request fails with the same message, naming the
bad field and value, in-process and over gRPC."""

from __future__ import annotations

from ..api.v1 import speccascade_pb2 as pb
from ..cascade import Rule, SamplingParams
from ..engine.generation import GenerationResult
from ..engine.request import GenerationRequest, Method
from ..engine.stats import GenerationStats, Source
from .config import CascadePolicy

RULES_BY_PROTO = {
    pb.RULE_LOSSLESS: Rule.LOSSLESS, pb.RULE_CHOW: Rule.CHOW, pb.RULE_DIFF: Rule.DIFF,
    pb.RULE_OPT: Rule.OPT, pb.RULE_TOKEN: Rule.TOKEN, pb.RULE_LOSSY: Rule.LOSSY,
}
PROTO_BY_RULE = {rule: value for value, rule in RULES_BY_PROTO.items()}
METHODS_BY_PROTO = {
    pb.METHOD_CASCADE: Method.CASCADE, pb.METHOD_EXPERT_ONLY: Method.EXPERT_ONLY,
    pb.METHOD_DRAFTER_ONLY: Method.DRAFTER_ONLY, pb.METHOD_TOKEN_CASCADE: Method.TOKEN_CASCADE,
    pb.METHOD_SEQUENCE_CASCADE: Method.SEQUENCE_CASCADE,
}
PROTO_BY_METHOD = {method: value for value, method in METHODS_BY_PROTO.items()}
PROTO_BY_SOURCE = {Source.DRAFTER: pb.SOURCE_DRAFTER, Source.EXPERT: pb.SOURCE_EXPERT}
SOURCE_BY_PROTO = {value: source for source, value in PROTO_BY_SOURCE.items()}
PROTO_BY_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def rule_from_proto(value: int, default: Rule) -> Rule:
    if value == pb.RULE_UNSPECIFIED:
        return default
    if value not in RULES_BY_PROTO:
        known = ", ".join(pb.Rule.Name(v) for v in RULES_BY_PROTO)
        raise ValueError(f"policy.rule={value} is not a known rule; expected one of: {known}")
    return RULES_BY_PROTO[value]


def method_from_proto(value: int) -> Method:
    if value == pb.METHOD_UNSPECIFIED:
        return Method.CASCADE
    if value not in METHODS_BY_PROTO:
        known = ", ".join(pb.Method.Name(v) for v in METHODS_BY_PROTO)
        raise ValueError(f"policy.method={value} is not a known method; expected one of: {known}")
    return METHODS_BY_PROTO[value]


def request_from_proto(message: pb.GenerateRequest, policy: CascadePolicy) -> GenerationRequest:
    """Validate a request against the engine's rules and the server's limits (ValueError names the
    bad field). Unset fields take the server's defaults."""
    which = message.WhichOneof("input")
    if which is None:
        raise ValueError("prompt: give either prompt or chat messages")
    method = method_from_proto(message.policy.method)
    rule = rule_from_proto(message.policy.rule, policy.rule)
    alpha = message.policy.alpha if message.policy.HasField("alpha") else policy.alpha
    max_new_tokens = message.max_new_tokens if message.HasField("max_new_tokens") else policy.max_new_tokens
    if max_new_tokens > policy.max_new_tokens_cap:
        raise ValueError(f"max_new_tokens={max_new_tokens} is above this server's cap of "
                         f"{policy.max_new_tokens_cap}")
    sampling = message.sampling
    params = SamplingParams(
        temperature=sampling.temperature if sampling.HasField("temperature") else 0.0,
        top_k=sampling.top_k if sampling.HasField("top_k") else 0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
    )
    messages = None
    if which == "chat":
        messages = [{"role": m.role, "content": m.content} for m in message.chat.messages]
    return GenerationRequest(
        prompt=message.prompt if which == "prompt" else None, messages=messages, method=method, rule=rule,
        alpha=alpha,
        block_size=message.policy.block_size if message.policy.HasField("block_size") else policy.block_size,
        max_new_tokens=max_new_tokens, sampling=params,
        seed=sampling.seed if sampling.HasField("seed") else None, stop=tuple(message.stop),
    )


def stats_to_proto(stats: GenerationStats, request: GenerationRequest, *, seed: int, expert_only_fallback: bool,
                   tier_retries: int) -> pb.GenerationStats:
    counts = {name: getattr(stats, name) for name in pb.GenerationStats.DESCRIPTOR.fields_by_name
              if hasattr(stats, name) and name not in ("method", "rule", "seed")}
    return pb.GenerationStats(
        **counts, seed=seed, expert_only_fallback=expert_only_fallback, tier_retries=tier_retries,
        method=PROTO_BY_METHOD[request.method],
        rule=PROTO_BY_RULE[request.rule] if request.method is Method.CASCADE else pb.RULE_UNSPECIFIED,
    )


def usage_of(result: GenerationResult) -> pb.Usage:
    return pb.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids))
