"""A Python client of the speccascade gRPC API.

    with SpecCascadeClient("localhost:9000") as client:
        for chunk in client.stream(prompt="def fib(n):", rule="chow", alpha=0.3, max_new_tokens=64):
            print(chunk.text, end="")
        print(chunk.stats)

Unset options take the server's defaults. Errors surface as `grpc.RpcError` with the server's
status code (INVALID_ARGUMENT names the bad field). A server with tenants wants an API key:
`SpecCascadeClient(..., api_key="sc-...")`, or the environment variable SPECCASCADE_API_KEY.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .v1 import speccascade_pb2 as pb
from .v1 import speccascade_pb2_grpc as pb_grpc

RULES = {name.removeprefix("RULE_").lower(): value for name, value in pb.Rule.items() if value}
# The method names of the in-process engine (`speccascade.engine.request.Method`).
METHODS = {"cascade": pb.METHOD_CASCADE, "expert": pb.METHOD_EXPERT_ONLY, "drafter": pb.METHOD_DRAFTER_ONLY,
           "token-cascade": pb.METHOD_TOKEN_CASCADE, "sequence-cascade": pb.METHOD_SEQUENCE_CASCADE}
PIPELINES = {"on": pb.PIPELINE_ON, "off": pb.PIPELINE_OFF, "auto": pb.PIPELINE_AUTO}
SOURCES = {pb.SOURCE_DRAFTER: "drafter", pb.SOURCE_EXPERT: "expert"}
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


def build_request(
    prompt: str | None = None, *, messages: Sequence[dict] | None = None, method: str | None = None,
    rule: str | None = None,
    alpha: float | None = None, block_size: int | None = None, max_new_tokens: int | None = None,
    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
    seed: int | None = None, stop: Sequence[str] = (), pipeline: str | None = None,
    ignore_eos: bool | None = None, min_tokens: int | None = None, skip_special_tokens: bool | None = None,
) -> pb.GenerateRequest:
    request = pb.GenerateRequest(stop=list(stop))
    if messages is not None:
        request.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif prompt is not None:
        request.prompt = prompt
    if method is not None:
        if method.lower() not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")
        request.policy.method = METHODS[method.lower()]
    if pipeline is not None:
        if pipeline.lower() not in PIPELINES:
            raise ValueError(f"unknown pipeline {pipeline!r}; expected one of: {', '.join(PIPELINES)}")
        request.policy.pipeline = PIPELINES[pipeline.lower()]
    if rule is not None:
        if rule.lower() not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of: {', '.join(RULES)}")
        request.policy.rule = RULES[rule.lower()]
    for message, field, value in (
        (request.policy, "alpha", alpha), (request.policy, "block_size", block_size),
        (request, "max_new_tokens", max_new_tokens), (request.sampling, "temperature", temperature),
        (request.sampling, "top_k", top_k), (request.sampling, "top_p", top_p), (request.sampling, "seed", seed),
        (request, "ignore_eos", ignore_eos), (request, "min_tokens", min_tokens),
        (request, "skip_special_tokens", skip_special_tokens),
    ):
        if value is not None:
            setattr(message, field, value)
    return request


API_KEY_ENV = "SPECCASCADE_API_KEY"


class SpecCascadeClient:
    def __init__(self, target: str = "localhost:9000", *, application: str | None = None,
                 timeout: float | None = None, channel: grpc.Channel | None = None, api_key: str | None = None):
        """`application` selects a Serve application when the cluster runs several; `timeout` is
        the default deadline (seconds) per call; `api_key` (default: $SPECCASCADE_API_KEY) is sent
        as `authorization: Bearer <key>`."""
        self.channel = channel or grpc.insecure_channel(target)
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.metadata = ((("application", application),) if application else ()) + (
            (("authorization", f"Bearer {api_key}"),) if api_key else ())
        self.timeout = timeout
        self._stub = pb_grpc.SpecCascadeStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "SpecCascadeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _request(self, request: pb.GenerateRequest | None, options: dict) -> pb.GenerateRequest:
        return request if request is not None else build_request(**options)

    def _metadata(self, request_id: str | None) -> tuple:
        return self.metadata + ((("request_id", request_id),) if request_id else ())

    def generate(self, request: pb.GenerateRequest | None = None, *, timeout: float | None = None,
                 request_id: str | None = None, **options) -> pb.GenerateResponse:
        """`request_id` names the request in the server's logs (Serve's request id; default: drawn)."""
        return self._stub.Generate(self._request(request, options), metadata=self._metadata(request_id),
                                   timeout=timeout or self.timeout)

    def stream(self, request: pb.GenerateRequest | None = None, *, timeout: float | None = None,
               request_id: str | None = None, **options) -> Iterator[pb.GenerateStreamResponse]:
        """Chunks as they are produced; the last one carries finish reason, usage and stats.
        The returned iterator is also a grpc call: `.cancel()` stops generation on the server."""
        return self._stub.GenerateStream(self._request(request, options), metadata=self._metadata(request_id),
                                         timeout=timeout or self.timeout)

    def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        """SERVING / NOT_SERVING / ... for the application (service "" or speccascade.v1.SpecCascade)."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), metadata=self.metadata,
                                      timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
