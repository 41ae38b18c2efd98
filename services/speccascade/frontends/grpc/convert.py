"""Between the public protobuf messages and the engine's types. Validation stays where it is
(`GenerationRequest`, `SamplingParams`), so a bad request fails with the same message, naming the
bad field and value, in-process and over gRPC."""

from __future__ import annotations

from ...api.v1 import speccascade_pb2 as pb
from ...config.app import CascadePolicy
from ...engine.generation import GenerationChunk, GenerationResult
from ...engine.request import GenerationRequest
from ...engine.stats import Source, TokenLogprob
from ...options import Method, Pipeline, Rule
from ...serving.clients import Transport
from ...serving.requests import request_with_policy

RULES_BY_PROTO = {
    pb.RULE_LOSSLESS: Rule.LOSSLESS, pb.RULE_CHOW: Rule.CHOW, pb.RULE_DIFF: Rule.DIFF,
    pb.RULE_OPT: Rule.OPT, pb.RULE_TOKEN: Rule.TOKEN, pb.RULE_LOSSY: Rule.LOSSY,
    pb.RULE_TOKEN_V1: Rule.TOKEN_V1, pb.RULE_TOKEN_V2: Rule.TOKEN_V2,
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


PIPELINES_BY_PROTO = {pb.PIPELINE_ON: Pipeline.ON, pb.PIPELINE_OFF: Pipeline.OFF, pb.PIPELINE_AUTO: Pipeline.AUTO}
PROTO_BY_PIPELINE = {pipeline: value for value, pipeline in PIPELINES_BY_PROTO.items()}


def _enum_from_proto(value: int, field: str, table: dict, names, what: str, unspecified):
    """`table[value]`, `unspecified` for the proto's 0, or a ValueError naming the field and the known values."""
    if value == 0:  # every enum of the API keeps 0 for UNSPECIFIED
        return unspecified
    if value not in table:
        known = ", ".join(names.Name(v) for v in table)
        raise ValueError(f"policy.{field}={value} is not a known {what}; expected one of: {known}")
    return table[value]


def rule_from_proto(value: int, default: Rule) -> Rule:
    return _enum_from_proto(value, "rule", RULES_BY_PROTO, pb.Rule, "rule", default)


def pipeline_from_proto(value: int) -> Pipeline | None:
    return _enum_from_proto(value, "pipeline", PIPELINES_BY_PROTO, pb.Pipeline, "pipelining mode", None)


def method_from_proto(value: int) -> Method:
    return _enum_from_proto(value, "method", METHODS_BY_PROTO, pb.Method, "method", Method.CASCADE)


def request_from_proto(message: pb.GenerateRequest, policy: CascadePolicy) -> GenerationRequest:
    """Validate a request against the engine's rules and the server's limits (ValueError names the
    bad field). Unset fields take the server's defaults."""
    which = message.WhichOneof("input")
    if which is None:
        raise ValueError("prompt: give a prompt, chat messages or prompt tokens")
    policy_message, sampling = message.policy, message.sampling

    def optional(container, name: str):
        return getattr(container, name) if container.HasField(name) else None

    messages = None
    if which == "chat":
        messages = [{"role": m.role, "content": m.content} for m in message.chat.messages]
    return request_with_policy(
        policy, prompt=message.prompt if which == "prompt" else None, messages=messages,
        prompt_token_ids=list(message.prompt_tokens.ids) if which == "prompt_tokens" else None,
        method=method_from_proto(policy_message.method), rule=rule_from_proto(policy_message.rule, policy.rule),
        alpha=optional(policy_message, "alpha"), block_size=optional(policy_message, "block_size"),
        max_new_tokens=optional(message, "max_new_tokens"), temperature=optional(sampling, "temperature"),
        top_k=optional(sampling, "top_k"), top_p=optional(sampling, "top_p"), seed=optional(sampling, "seed"),
        stop=tuple(message.stop), pipeline=pipeline_from_proto(policy_message.pipeline),
        ignore_eos=optional(message, "ignore_eos"), min_tokens=optional(message, "min_tokens"),
        skip_special_tokens=optional(message, "skip_special_tokens"),
        logprobs=optional(message, "logprobs"), prompt_logprobs=optional(message, "prompt_logprobs"),
    )


def usage_of(result: GenerationResult) -> pb.Usage:
    return pb.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids))


def stats_proto(result: GenerationResult, request: GenerationRequest, transport: Transport) -> pb.GenerationStats:
    """The request's counters (every stats field the message has, by name), the seed, what it ran,
    and what the transport did."""
    counts = {name: getattr(result.stats, name) for name in pb.GenerationStats.DESCRIPTOR.fields_by_name
              if hasattr(result.stats, name) and name not in ("method", "rule", "seed")}
    return pb.GenerationStats(
        **counts, seed=result.seed, expert_only_fallback=transport.expert_only_fallback,
        tier_retries=transport.tier_retries, context_resends=transport.context_resends,
        method=PROTO_BY_METHOD[request.method], pipeline=PROTO_BY_PIPELINE[request.pipeline],
        rule=PROTO_BY_RULE[request.rule] if request.method is Method.CASCADE else pb.RULE_UNSPECIFIED,
    )


def logprobs_to_proto(token_ids: list[int], entries: "list[TokenLogprob | None] | None") -> list[pb.TokenLogprob]:
    """One TokenLogprob per token (none when not asked for); an entry of None (the prompt's first
    token) leaves `logprob` unset."""
    out = []
    for token, entry in zip(token_ids, entries or []):
        if entry is None:
            out.append(pb.TokenLogprob(token_id=token))
            continue
        logprob, top = entry
        out.append(pb.TokenLogprob(token_id=token, logprob=logprob,
                                   top=[pb.TopLogprob(token_id=i, logprob=value) for i, value in top]))
    return out


def result_to_proto(result: GenerationResult, request: GenerationRequest, transport: Transport) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=result.text, token_ids=result.token_ids, sources=[PROTO_BY_SOURCE[s] for s in result.sources],
        finish_reason=PROTO_BY_FINISH[result.finish_reason], usage=usage_of(result),
        stats=stats_proto(result, request, transport),
        logprobs=logprobs_to_proto(result.token_ids, result.logprobs),
        prompt_logprobs=logprobs_to_proto(result.prompt_token_ids or [], result.prompt_logprobs),
    )


def chunk_to_proto(chunk: GenerationChunk, request: GenerationRequest, transport: Transport) -> pb.GenerateStreamResponse:
    message = pb.GenerateStreamResponse(
        text=chunk.text,
        segments=[pb.TextSegment(text=s.text, source=PROTO_BY_SOURCE[s.source]) for s in chunk.segments],
        token_ids=chunk.token_ids, sources=[PROTO_BY_SOURCE[s] for s in chunk.sources],
        logprobs=logprobs_to_proto(chunk.token_ids, chunk.logprobs),
        prompt_logprobs=logprobs_to_proto(chunk.prompt_token_ids or [], chunk.prompt_logprobs),
    )
    if chunk.result is not None:
        message.finish_reason = PROTO_BY_FINISH[chunk.result.finish_reason]
        message.usage.CopyFrom(usage_of(chunk.result))
        message.stats.CopyFrom(stats_proto(chunk.result, request, transport))
    return message
