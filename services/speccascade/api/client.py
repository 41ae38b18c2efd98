"""A Python client of the speccascade gRPC API.

    with SpecCascadeClient("localhost:9000") as client:
        for chunk in client.stream(prompt="def fib(n):", rule="chow", alpha=0.3, max_new_tokens=64):
            print(chunk.text, end="")
        print(chunk.stats)

Unset options take the server's defaults. Errors surface as `grpc.RpcError` with the server's
status code (INVALID_ARGUMENT names the bad field). A server with tenants wants an API key:
`SpecCascadeClient(..., api_key="sc-...")`, or the environment variable SPECCASCADE_API_KEY.

A stream that breaks off after its first chunk (its router replica died or restarted, the
connection was reset: UNAVAILABLE or INTERNAL) is resumed transparently: the request is sent again with the resume
token of the last chunk received, and goes on on another router replica with exactly the chunks the
broken stream would have sent next. A call whose router replica died before it answered anything (a
stream before its first chunk, a unary call; Serve's proxy says the replica's actor died) is sent
again as it was: nothing reached the caller, and with a seed the output is the same. Other errors
before the first chunk are the caller's to see. `resume_attempts` bounds the tries in a row
without a chunk.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Sequence

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
    prompt_token_ids: Sequence[int] | None = None, logprobs: int | None = None, prompt_logprobs: int | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest from one of `prompt`, `messages` or `prompt_token_ids` (ids of the served
    pair's tokenizer, taken as is) and the options to set; unset ones take the server's defaults.
    `logprobs` / `prompt_logprobs`: alternatives listed per output / prompt token (0..20)."""
    if sum(given is not None for given in (prompt, messages, prompt_token_ids)) > 1:
        raise ValueError("give one of prompt, messages or prompt_token_ids")
    request = pb.GenerateRequest(stop=list(stop))
    if messages is not None:
        request.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif prompt_token_ids is not None:
        request.prompt_tokens.SetInParent()  # an empty list is still the prompt-tokens input (and refused)
        request.prompt_tokens.ids.extend(prompt_token_ids)
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
        (request, "skip_special_tokens", skip_special_tokens), (request, "logprobs", logprobs),
        (request, "prompt_logprobs", prompt_logprobs),
    ):
        if value is not None:
            setattr(message, field, value)
    return request


API_KEY_ENV = "SPECCASCADE_API_KEY"
RESUME_ATTEMPTS = 8  # tries in a row, without a chunk in between, to resume a broken stream
RESUMABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL})
RETRY_AFTER_METADATA = "retry-after-ms"


# How Serve's proxy reports a call whose router replica died under it (Ray's ActorDiedError).
_REPLICA_DIED = re.compile(r"actor died|actor is dead|ActorDiedError|ActorUnavailableError", re.IGNORECASE)


def _backoff(attempt: int) -> float:
    return min(2.0, 0.25 * 2 ** attempt)


def router_lost(error: grpc.RpcError) -> bool:
    """Whether a call failed because its router replica went away (nothing about the request)."""
    return error.code() in RESUMABLE_CODES and bool(_REPLICA_DIED.search(error.details() or ""))


def retry_delay(error: grpc.RpcError, failures: int, *, broke_off: bool) -> float | None:
    """Seconds to wait before sending a failed call again, or None when `error` ends it.
    `broke_off`: the call had delivered chunks, so any UNAVAILABLE or INTERNAL is a drop; before
    that, only a lost router is. A call sent again may meet the quota its dead router still holds
    (RESOURCE_EXHAUSTED, until the ledger's lease runs out): it waits for the hint."""
    code = error.code()
    if (code in RESUMABLE_CODES) if broke_off else router_lost(error):
        return _backoff(failures)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and failures > 0:
        hint = dict(error.trailing_metadata() or ()).get(RETRY_AFTER_METADATA)
        return float(hint) / 1000 if hint and hint.isdigit() else _backoff(failures)
    return None


class _Deadline:
    """A call's one deadline across the tries of it (None: no deadline)."""

    def __init__(self, timeout: float | None):
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def leaves(self, wait: float) -> bool:
        """Whether waiting `wait` seconds still leaves time for another try."""
        return self.at is None or self.at - time.monotonic() > wait


def _check_attempts(attempts: object) -> int:
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise ValueError(f"resume_attempts must be an integer >= 0, got {attempts!r}")
    return attempts


class ResumingStream:
    """The chunks of one streamed request, resumed after a drop (see the module's doc). An
    iterator like the gRPC call it wraps; `cancel()` stops generation on the server; `resumes`
    counts the times the stream was continued."""

    def __init__(self, start: Callable[[pb.GenerateRequest, float | None], Iterator[pb.GenerateStreamResponse]],
                 request: pb.GenerateRequest, *, timeout: float | None, attempts: int):
        self._start = start
        self._request = request
        self._deadline = _Deadline(timeout)
        self._attempts = attempts
        self._failures = 0  # in a row, since the last chunk
        self._token = ""
        self._cancelled = self._finished = False
        self.resumes = 0
        self._call = start(request, timeout)

    def __iter__(self) -> "ResumingStream":
        return self

    def _wait_before_retry(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before trying again, or None when `error` ends the stream."""
        if self._cancelled or self._finished or self._failures >= self._attempts:
            return None
        return retry_delay(error, self._failures, broke_off=bool(self._token))

    def __next__(self) -> pb.GenerateStreamResponse:
        while True:
            try:
                chunk = next(self._call)
            except StopIteration:
                raise
            except grpc.RpcError as error:
                wait = self._wait_before_retry(error)
                if wait is None or not self._deadline.leaves(wait):
                    raise
                self._failures += 1
                time.sleep(wait)
                request = pb.GenerateRequest()
                request.CopyFrom(self._request)
                request.resume_token = self._token
                self.resumes += 1
                self._call = self._start(request, self._deadline.remaining())
                continue
            self._failures = 0
            if chunk.resume_token:
                self._token = chunk.resume_token
            if chunk.finish_reason:
                self._finished = True
            return chunk

    @property
    def resume_token(self) -> str:
        """The token of the last chunk received ("" before the first)."""
        return self._token

    def cancel(self) -> bool:
        self._cancelled = True
        return self._call.cancel()


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
        self.resent_calls = 0  # unary calls sent again after their router replica died

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
                 request_id: str | None = None, resume_attempts: int = RESUME_ATTEMPTS,
                 **options) -> pb.GenerateResponse:
        """`request_id` names the request in the server's logs (Serve's request id; default: drawn).
        A call whose router replica died is sent again (up to `resume_attempts` times, within the
        one deadline `timeout`; counted in `self.resent_calls`)."""
        attempts, message = _check_attempts(resume_attempts), self._request(request, options)
        deadline, failures = _Deadline(timeout or self.timeout), 0
        while True:
            try:
                return self._stub.Generate(message, metadata=self._metadata(request_id), timeout=deadline.remaining())
            except grpc.RpcError as error:
                wait = retry_delay(error, failures, broke_off=False) if failures < attempts else None
                if wait is None or not deadline.leaves(wait):
                    raise
                failures += 1
                self.resent_calls += 1
                time.sleep(wait)

    def stream(self, request: pb.GenerateRequest | None = None, *, timeout: float | None = None,
               request_id: str | None = None, resume_attempts: int = RESUME_ATTEMPTS,
               **options) -> ResumingStream:
        """Chunks as they are produced; the last one carries finish reason, usage and stats.
        `.cancel()` on the returned iterator stops generation on the server. A stream that breaks
        off is resumed where it stopped, and one whose router replica died before its first chunk is
        sent again (up to `resume_attempts` tries in a row; 0: never), within the one deadline
        `timeout`; the iterator's `resumes` counts both."""
        _check_attempts(resume_attempts)
        metadata = self._metadata(request_id)

        def start(message: pb.GenerateRequest, remaining: float | None):
            return self._stub.GenerateStream(message, metadata=metadata, timeout=remaining)

        return ResumingStream(start, self._request(request, options), timeout=timeout or self.timeout,
                              attempts=resume_attempts)

    def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        """SERVING / NOT_SERVING / ... for the application (service "" or speccascade.v1.SpecCascade)."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), metadata=self.metadata,
                                      timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
