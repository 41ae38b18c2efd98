"""The HTTP routes of the OpenAI-compatible API: completions, chat completions (streamed as
server-sent events) and models, plus a health check and vLLM's tokenizer routes (`tokenization`),
on Serve's HTTP proxy beside gRPC (see `speccascade.app`).

    from openai import OpenAI

    client = OpenAI(base_url="http://localhost:8000/v1", api_key="<the tenant's key, or anything without tenants>")
    stream = client.chat.completions.create(
        model="speccascade", messages=[{"role": "user", "content": "Reverse a string in Python."}],
        stream=True, extra_body={"rule": "chow", "alpha": 0.3})

HTTP only: the shapes are `protocol.py`, their mapping to and from the engine `mapping.py`, and
everything else is the router core's, shared with gRPC: `RouterCore.admit` (the API key of the
`Authorization: Bearer` header, the tenant's policy and quotas, the request's validation) and
`RouterCore.serve_request` (fair admission, the loop, metrics).
Errors are OpenAI error objects: 400 for a bad request (naming the field), 401 / 403 / 429 for
tenancy's refusals (429 with `retry-after-ms` and `retry-after` headers, which OpenAI clients
honour), 404 for an unknown model or path, 503 when the expert tier has no running replica
(before the first byte of a stream; later, as an `error` event, which OpenAI clients raise).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...serving.clients import TierUnavailableError
from ...tenancy import (
    RETRY_AFTER_HEADER,
    MissingKey,
    PermissionDenied,
    QuotaExceeded,
    QuotaUnavailable,
    TenancyError,
    Unauthenticated,
)
from . import mapping, tokenization
from .mapping import Reply
from .protocol import ChatCompletionBody, CompletionBody, OpenAIError, parse_body

# Tenancy's refusals as HTTP: (status, OpenAI error type, code).
TENANCY_ERRORS = {Unauthenticated: (401, "authentication_error", "invalid_api_key"),
                  PermissionDenied: (403, "permission_error", "permission_denied"),
                  QuotaUnavailable: (503, "server_error", "quota_unavailable"),  # before its base class
                  QuotaExceeded: (429, "rate_limit_error", "rate_limit_exceeded")}
SEND_KEY_HINT = "send the header `Authorization: Bearer <key>` (or `X-API-Key: <key>`)"


def refused(error: TenancyError) -> OpenAIError:
    status, type_, code = next(answer for kind, answer in TENANCY_ERRORS.items() if isinstance(error, kind))
    headers = {}
    if isinstance(error, QuotaExceeded):
        milliseconds = error.retry_after_ms
        headers = {RETRY_AFTER_HEADER: str(milliseconds), "retry-after": str(-(-milliseconds // 1000))}
    message = f"{error}: {SEND_KEY_HINT}" if isinstance(error, MissingKey) else str(error)
    return OpenAIError(status, message, type=type_, code=code, headers=headers,
                       param=mapping.param_of(message, chat=False))


def unavailable(error: TierUnavailableError) -> OpenAIError:
    return OpenAIError(503, str(error), type="server_error", code="tier_unavailable")


def _resume_token(raw: bytes) -> str | None:
    """The body's `resume_token`, looked at before the body is parsed (the router checks it with
    the caller's key); a body that is not JSON, or a token that is not text, fails in parsing."""
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    token = document.get("resume_token") if isinstance(document, dict) else None
    return token if isinstance(token, str) and token else None


def parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError as error:
        raise OpenAIError(400, f"the request body is not valid JSON: {error}") from None


async def json_body(request: Request) -> object:
    return parse_json(await request.body())


def sse(event: dict) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def build_http_app(router) -> FastAPI:
    """The ASGI app for one router replica (`router`: its `speccascade.serving.router.RouterCore`)."""
    app = FastAPI(title="speccascade", description="OpenAI-compatible API of a speculative cascade")
    created = int(time.time())
    drafter, expert = router.config.drafter.model, router.config.expert.model
    token_texts = mapping.TokenTexts(router.generation.tokenizer)  # logprobs' token texts, cached per id

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, error: OpenAIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(OpenAIError(error.status_code, message).body(), status_code=error.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        serving = await router.serving()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    def caller_of(request: Request) -> None:
        """Who calls (the model list decodes nothing, so only the key is checked)."""
        try:
            router.identify(request.headers.items())
        except TenancyError as error:
            raise refused(error) from None

    tokenizer, window = router.generation.tokenizer, router.generation.context_window

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        caller_of(request)
        return tokenization.tokenize_json(tokenizer, await json_body(request), window)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        caller_of(request)
        return tokenization.detokenize_json(tokenizer, await json_body(request))

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict:
        caller_of(request)
        return tokenization.tokenizer_info_json(tokenizer, window)

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models(request: Request) -> dict:
        caller_of(request)
        return mapping.models_json(drafter, expert, created)

    @v1.get("/models/{model}")
    async def model(request: Request, model: str) -> dict:
        caller_of(request)
        mapping.check_model(model)
        return mapping.model_json(drafter, expert, created)

    @v1.post("/completions")
    async def completions(request: Request):
        return await generate(request, CompletionBody, "completion")

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionBody, "chat")

    async def admit(http_request: Request, body_type: type):
        """The router's admission, as for gRPC: first the caller by its API key, then the request
        built under the caller's policy from the body (its JSON, shape and model are checked inside
        `build`, so an unknown key is a 401 whatever the body), then the caller's quota."""
        raw = await http_request.body()
        parsed: list = []

        def build(policy):
            body = parse_body(parse_json(raw), body_type)
            mapping.check_model(body.model)
            parsed.append(body)
            return mapping.generation_request(body, policy)

        try:
            admitted = await router.admit(http_request.headers.items(), build, resume_token=_resume_token(raw))
        except TenancyError as error:
            raise refused(error) from None
        except OpenAIError:
            raise
        except ValueError as error:  # the request's validation, or a prompt too long for the window
            raise mapping.invalid_request(error, chat=body_type is ChatCompletionBody) from None
        return parsed[0], admitted

    async def generate(http_request: Request, body_type: type, kind: str):
        body, admitted = await admit(http_request, body_type)
        reply = Reply.new(kind, extras=mapping.choice_extras(body, admitted.prompt, token_texts))
        chunks = router.serve_request(admitted)
        if not body.stream:
            segments, result, transport = [], None, None
            try:
                async for chunk, transport in chunks:
                    segments += chunk.segments
                    result = chunk.result or result
            except TierUnavailableError as error:
                raise unavailable(error) from None
            return JSONResponse(reply.response(result, segments, admitted.request, transport))
        # Wait for the first round before answering, so that a tier that is down is a 503 status
        # rather than an error inside a 200 stream.
        try:
            first = await anext(chunks)
        except TierUnavailableError as error:
            await chunks.aclose()
            raise unavailable(error) from None
        options = body.stream_options
        include_usage = bool(options and options.include_usage)
        running = mapping.RunningUsage(len(admitted.prompt)) if options and options.continuous_usage_stats else None
        return StreamingResponse(events(reply, first, chunks, admitted, include_usage, running),
                                 media_type="text/event-stream")

    async def events(reply: Reply, first: tuple, chunks: AsyncIterator, admitted, include_usage: bool,
                     running: mapping.RunningUsage | None) -> AsyncIterator[str]:
        """`running`: the usage so far, put in every chunk (vLLM's continuous usage stats). Every
        event of a generation chunk carries the stream's `resume_token` after that chunk."""
        try:
            for event in reply.first_chunks(usage=running.json() if running else None):
                yield sse(event)
            chunk, transport = first
            while True:
                usage = running.add(chunk) if running else None
                token = admitted.resume_token(chunk)
                for event in reply.chunks(chunk, admitted.request, transport, include_usage=include_usage,
                                          usage=usage):
                    yield sse({**event, "resume_token": token})
                if chunk.result is not None:
                    break
                chunk, transport = await anext(chunks)
            yield SSE_DONE
        except TierUnavailableError as error:
            yield sse(unavailable(error).body())
        finally:
            await chunks.aclose()  # a client that went away cancels decoding; both tiers free the session

    app.include_router(v1)
    return app
