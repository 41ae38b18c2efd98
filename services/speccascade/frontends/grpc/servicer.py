"""The gRPC front-end: the SpecCascade service (`Generate`, `GenerateStream`) and grpc.health.v1
(`Check`, `Watch`), as methods named like the RPCs, which Serve's gRPC proxy calls on the router
deployment (`speccascade.app.ingress`). A thin adapter over `RouterCore`: protobuf in, the core's
`admit` and `serve_request`, protobuf out (`convert.py`).

Status codes: INVALID_ARGUMENT for a bad request (the message names the field), UNAUTHENTICATED /
PERMISSION_DENIED / RESOURCE_EXHAUSTED (with `retry-after-ms` in the trailing metadata) for
tenancy's refusals, UNAVAILABLE when the expert tier has no running replica, CANCELLED /
DEADLINE_EXCEEDED from the client side. With the drafter tier down, requests are decoded
expert-only and say so in their stats.

Every GenerateStream chunk carries a resume token; a request that sends one back
(`GenerateRequest.resume_token`) continues that stream (`serving.resume`; a token that does not
verify or belongs to another request is INVALID_ARGUMENT, another tenant's PERMISSION_DENIED).

A request that ends early on the client's side (it hung up, or its deadline passed: Serve's proxy
cancels the request either way and does not pass the deadline on, so the two look alike here) is
logged as one line, with no traceback; real failures keep theirs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from grpc_health.v1 import health_pb2

from ...api.v1 import speccascade_pb2 as pb
from ...engine.generation import GenerationChunk
from ...serving.clients import TierUnavailableError, Transport
from ...serving.router import Admitted, RouterCore
from ...tenancy import RETRY_AFTER_HEADER, MissingKey, QuotaExceeded, TenancyError
from .convert import chunk_to_proto, request_from_proto, result_to_proto

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecCascade"].full_name
HEALTH_WATCH_PERIOD_S = 5.0
SEND_KEY_HINT = "send the metadata `authorization: Bearer <key>` (or `x-api-key: <key>`)"


class Progress:
    """How far a request got, for the one line that says it was cancelled."""

    def __init__(self, method: str):
        self.method = method
        self.started = time.monotonic()
        self.tokens = 0

    def log_cancelled(self) -> None:
        # Serve's log format adds the request id.
        log.info("%s cancelled by the client (it hung up or its deadline passed) after %d tokens, %.1fs",
                 self.method, self.tokens, time.monotonic() - self.started)


class GrpcFrontend:
    """The RPC methods over a router core."""

    core: RouterCore

    @staticmethod
    def _fail(context, code: grpc.StatusCode, error: Exception | str) -> None:
        context.set_code(code)
        context.set_details(str(error))

    async def _admit(self, message: pb.GenerateRequest, grpc_context) -> Admitted | None:
        """`admit` with its failures as status codes; None when tenancy refused the request (its
        status, and a retry hint for quotas, are set on the context). Other failures raise."""
        try:
            return await self.core.admit(grpc_context.invocation_metadata(),
                                         lambda policy: request_from_proto(message, policy),
                                         resume_token=message.resume_token or None)
        except TenancyError as error:
            if isinstance(error, QuotaExceeded):
                grpc_context.set_trailing_metadata([(RETRY_AFTER_HEADER, str(error.retry_after_ms))])
            message = f"{error}: {SEND_KEY_HINT}" if isinstance(error, MissingKey) else str(error)
            self._fail(grpc_context, grpc.StatusCode[error.status], message)
            return None
        except ValueError as error:
            self._fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, error)
            raise

    async def _chunks(self, message: pb.GenerateRequest, grpc_context
                      ) -> AsyncIterator[tuple[GenerationChunk, Admitted, Transport] | None]:
        """The request's chunks, with failures turned into gRPC status codes. A tenancy refusal
        yields None once and ends: the RPC then returns normally, since Serve's proxy forwards the
        status and trailing metadata (the retry hint) set on the context only with a message, and
        drops the metadata of a raised error."""
        admitted = await self._admit(message, grpc_context)
        if admitted is None:
            yield None
            return
        try:
            # aclosing: when this generator is closed early (a cancelled stream), the session is
            # released right then, not whenever the abandoned inner generator is collected.
            async with aclosing(self.core.serve_request(admitted)) as chunks:
                async for chunk, transport in chunks:
                    yield chunk, admitted, transport
        except TierUnavailableError as error:
            self._fail(grpc_context, grpc.StatusCode.UNAVAILABLE, error)
            raise

    async def Generate(self, message: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        response = pb.GenerateResponse()  # what a refused request returns, beside its error status
        progress = Progress("Generate")
        try:
            async with aclosing(self._chunks(message, grpc_context)) as chunks:
                async for item in chunks:
                    if item is not None:
                        chunk, admitted, transport = item
                        progress.tokens += len(chunk.token_ids)
                        if chunk.result is not None:
                            response = result_to_proto(chunk.result, admitted.request, transport)
        except asyncio.CancelledError:
            progress.log_cancelled()
            raise
        return response

    async def GenerateStream(self, message: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateStreamResponse]:
        progress = Progress("GenerateStream")
        try:
            async with aclosing(self._chunks(message, grpc_context)) as chunks:
                async for item in chunks:
                    if item is None:
                        yield pb.GenerateStreamResponse()
                        continue
                    chunk, admitted, transport = item
                    progress.tokens += len(chunk.token_ids)
                    response = chunk_to_proto(chunk, admitted.request, transport)
                    response.resume_token = admitted.resume_token(chunk)
                    yield response
        except (asyncio.CancelledError, GeneratorExit):
            progress.log_cancelled()
            raise

    async def _health_status(self) -> int:
        serving = await self.core.serving()
        return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

    def _known_service(self, service: str, context) -> bool:
        if service in ("", SERVICE_NAME):
            return True
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details(f"unknown service {service!r}; this server reports on {SERVICE_NAME!r}")
        return False

    async def Check(self, message: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check, answered by the router (see `speccascade.app` for why)."""
        if not self._known_service(message.service, grpc_context):
            raise LookupError(message.service)
        return health_pb2.HealthCheckResponse(status=await self._health_status())

    async def Watch(self, message: health_pb2.HealthCheckRequest, grpc_context):
        """grpc.health.v1.Health/Watch: the status now, then every change."""
        if not self._known_service(message.service, grpc_context):
            raise LookupError(message.service)
        last = None
        while True:
            status = await self._health_status()
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_WATCH_PERIOD_S)
