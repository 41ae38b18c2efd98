"""The router: gRPC ingress of the application, driving the decoding loop over the tiers.

It holds no model, only the pair's tokenizer (loaded through the engine's `PairInfo`). Each request
gets a session id; the remote roles (`clients.py`) tag every tier call with it (replica affinity,
the replica's cache) and send everything needed to answer from scratch, so a retried call on
another replica recomputes, with the same random draws (`engine.seeding`). The loop is the
engine's; the router adds admission, gRPC, health and metrics.

gRPC status codes: INVALID_ARGUMENT for a bad request (the message names the field),
UNAVAILABLE when the expert tier has no running replica, CANCELLED / DEADLINE_EXCEEDED from the
client side, which cancels this coroutine: the loop stops at its next await and both tiers free
the session's caches. With the drafter tier down, requests are decoded expert-only and say so
in their stats.

A request that ends early on the client's side (it hung up, or its deadline passed: Serve's proxy
cancels the request either way and does not pass the deadline on, so the two look alike here) is
logged as one line, with no traceback; real failures keep theirs.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from grpc_health.v1 import health_pb2

from ..api.v1 import speccascade_pb2 as pb
from ..autoscale import signals as autoscale_signals
from ..engine.generation import GenerationChunk, GenerationResult, PairInfo, TextGeneration
from ..engine.request import GenerationRequest
from ..tenancy import QuotaExceeded, TenancyError
from .access import GRPC_STATUS, RETRY_AFTER_METADATA, Caller, Gatekeeper
from .clients import RemoteDrafter, RemoteExpert, TierClient, TierUnavailableError, Transport
from .config import AppConfig
from .convert import PROTO_BY_FINISH, PROTO_BY_SOURCE, request_from_proto, stats_to_proto, usage_of
from .logs import log_to_replica_file
from .metrics import RouterMetrics, WindowCounters, metric_tags

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecCascade"].full_name
HEALTH_WATCH_PERIOD_S = 5.0


class Router:
    def __init__(self, drafter, expert, config: AppConfig):
        log_to_replica_file()
        self.config = config
        self.policy = config.policy
        pair = PairInfo.load(config.drafter.model, config.expert.model, progress=False)
        window = min(tier.sequence_limit(pair.context_window) for tier in (config.drafter, config.expert))
        self.generation = TextGeneration(pair.tokenizer, eos_ids=pair.eos_ids, context_window=window)
        self.metrics = RouterMetrics()
        self.window = WindowCounters()
        self.window_totals = autoscale_signals.CumulativeCounters(autoscale_signals.ROUTER_COUNTERS)
        self.drafter = TierClient(drafter, tier="drafter", config=config.router, metrics=self.metrics)
        self.expert = TierClient(expert, tier="expert", config=config.router, metrics=self.metrics)
        self._background: set[asyncio.Task] = set()
        self.active_sessions: set[str] = set()
        self.access = Gatekeeper(config.tenancy, config.policy)

    # ---- request preparation (errors here are the client's: INVALID_ARGUMENT) ----

    def prepare(self, message: pb.GenerateRequest, caller: Caller = Caller(None)
                ) -> tuple[GenerationRequest, list[int], int]:
        request = request_from_proto(message, self.access.policy_for(caller))
        prompt, limit = self.generation.prepare(request)
        return request, prompt, limit

    # ---- decoding over the tiers ----

    async def stream(self, request: GenerationRequest, prompt: list[int], limit: int, caller: Caller = Caller(None)
                     ) -> AsyncIterator[tuple[GenerationChunk, Transport]]:
        """Like `CascadeEngine.astream`, over the tiers. The last chunk carries the result.

        The session id, which keys both tiers' caches, starts with the tenant's id and is made
        here, never taken from a request: no tenant can name another's cache."""
        session_id = f"{caller.id or '-'}/{uuid.uuid4().hex}"
        self.active_sessions.add(session_id)
        transport = Transport()
        tags = metric_tags(request, caller.id)
        drafter = RemoteDrafter(self.drafter, session_id, transport, tag=tags["rule"], share=caller.share)
        expert = RemoteExpert(self.expert, session_id, transport, tag=tags["rule"], share=caller.share)
        observers = (self.window.observe, lambda record: self.metrics.observe(record, tags))
        chunks = self.generation.stream_rounds(request, prompt, limit, drafter, expert, observers)
        try:
            async for chunk in chunks:
                if chunk.result is not None:
                    self.metrics.observe_output(chunk.result.stats, tags)
                yield chunk, transport
        finally:
            try:
                await chunks.aclose()
            finally:  # whatever closing the loop raised, the tiers free the session
                self._release(session_id)

    def _release(self, session_id: str) -> None:
        """Free the session in both tiers, in the background: this also runs while the request's
        own task is being cancelled, and must not wait on the tiers.

        The release runs in a fresh context, outside the request's Serve context: calls made in a
        request's context are its children, and Serve cancels a cancelled request's children that
        are still being routed or running, the release among them; its session would then stay
        cached in the tier until the idle timeout."""
        self.active_sessions.discard(session_id)

        async def release(tier: TierClient):
            try:
                await asyncio.wait_for(tier.release(session_id), self.config.router.tier_call_timeout_s)
            except Exception as error:  # the tier is down: its caches went with it, or its idle sweep frees them
                log.info("releasing session %s on the %s tier failed: %r", session_id, tier.tier, error)

        async def release_both():
            await asyncio.gather(release(self.drafter), release(self.expert))

        task = asyncio.get_running_loop().create_task(release_both(), context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- gRPC methods (named like the RPCs; Serve's gRPC proxy calls them) ----

    def _fail(self, context, code: grpc.StatusCode, error: Exception, tags: dict[str, str]) -> None:
        context.set_code(code)
        context.set_details(str(error))
        self.metrics.requests.inc(tags={**tags, "code": code.name})

    def _refuse(self, context, error: TenancyError, tags: dict[str, str]) -> None:
        """A tenancy refusal: its status code, a retry hint for quotas, counted by reason."""
        if isinstance(error, QuotaExceeded):
            context.set_trailing_metadata([(RETRY_AFTER_METADATA, str(max(1, round(error.retry_after_s * 1000))))])
        self.metrics.rejections.inc(tags={"tenant": tags["tenant"], "reason": error.reason})
        self._fail(context, GRPC_STATUS[type(error)], error, tags)

    def _admit(self, message: pb.GenerateRequest, grpc_context):
        """Who calls, what they ask for, and their quota ticket; None when tenancy refused the request
        (its status is set on the context). Other failures become status codes and raise."""
        reloaded = self.access.reload_if_due()
        if reloaded:
            self.metrics.tenant_reloads.inc(tags={"result": reloaded})
        tags = metric_tags(None)
        try:
            caller = self.access.identify(grpc_context.invocation_metadata())
            tags = metric_tags(None, caller.id)
            request, prompt, limit = self.prepare(message, caller)
            tags = metric_tags(request, caller.id)
            self.access.check(caller, request)
            return caller, request, prompt, limit, self.access.admit(caller)
        except TenancyError as error:
            self._refuse(grpc_context, error, tags)
            return None
        except ValueError as error:
            self._fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, error, tags)
            raise

    async def _chunks(self, message: pb.GenerateRequest, grpc_context
                      ) -> AsyncIterator[tuple[GenerationChunk, GenerationRequest, Transport] | None]:
        """The request's chunks, with failures turned into gRPC status codes and counted. A tenancy
        refusal yields None once and ends: the RPC then returns normally, since Serve's proxy forwards
        the status and trailing metadata (the retry hint) set on the context only with a message, and
        drops the metadata of a raised error."""
        admitted = self._admit(message, grpc_context)
        if admitted is None:
            yield None
            return
        caller, request, prompt, limit, admission = admitted
        tags = metric_tags(request, caller.id)
        try:
            async with self.access.decoding_slot(caller, request):
                # aclosing: when this generator is closed early (a cancelled stream), the session is
                # released right then, not whenever the abandoned inner generator is collected.
                async with aclosing(self.stream(request, prompt, limit, caller)) as chunks:
                    async for chunk, transport in chunks:
                        if admission is not None:
                            admission.charge(len(chunk.token_ids))
                        yield chunk, request, transport
        except TierUnavailableError as error:
            self._fail(grpc_context, grpc.StatusCode.UNAVAILABLE, error, tags)
            raise
        finally:
            if admission is not None:
                admission.release()
        self.metrics.requests.inc(tags={**tags, "code": "OK"})

    async def Generate(self, message: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        response = pb.GenerateResponse()  # what a refused request returns, beside its error status
        progress = _Progress("Generate")
        try:
            async with aclosing(self._chunks(message, grpc_context)) as chunks:
                async for item in chunks:
                    if item is not None:
                        chunk, request, transport = item
                        progress.tokens += len(chunk.token_ids)
                        if chunk.result is not None:
                            response = result_to_proto(chunk.result, request, transport)
        except asyncio.CancelledError:
            progress.log_cancelled()
            raise
        return response

    async def GenerateStream(self, message: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateStreamResponse]:
        progress = _Progress("GenerateStream")
        try:
            async with aclosing(self._chunks(message, grpc_context)) as chunks:
                async for item in chunks:
                    if item is None:
                        yield pb.GenerateStreamResponse()
                        continue
                    progress.tokens += len(item[0].token_ids)
                    yield chunk_to_proto(*item)
        except (asyncio.CancelledError, GeneratorExit):
            progress.log_cancelled()
            raise

    async def _health_status(self) -> int:
        # The expert tier is required; without the drafter the service still answers (expert-only).
        serving = await self.expert.running_replicas() > 0
        return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

    def _known_service(self, service: str, context) -> bool:
        if service in ("", SERVICE_NAME):
            return True
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details(f"unknown service {service!r}; this server reports on {SERVICE_NAME!r}")
        return False

    async def Check(self, message: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check, answered by the router (see app.py for why)."""
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

    # ---- operations ----

    async def take_window(self) -> dict[str, float]:
        """The raw counters since the previous call (for autoscaling), and restart the window."""
        window = self.window.take().as_dict()
        self.window_totals.absorb(window)
        return window

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook for custom autoscaling metrics: the router's counters since it
        started (cumulative; `speccascade.autoscale.policy` turns them into rates)."""
        return self.window_totals.including(self.window.as_dict())

    async def active_session_count(self) -> int:
        return len(self.active_sessions)

    async def tenant_load(self) -> dict:
        """Requests in flight per tenant in this replica, and how many wait for a decoding slot."""
        return self.access.load()


class _Progress:
    """How far a request got, for the one line that says it was cancelled."""

    def __init__(self, method: str):
        self.method = method
        self.started = time.monotonic()
        self.tokens = 0

    def log_cancelled(self) -> None:
        # Serve's log format adds the request id.
        log.info("%s cancelled by the client (it hung up or its deadline passed) after %d tokens, %.1fs",
                 self.method, self.tokens, time.monotonic() - self.started)


def stats_proto(result: GenerationResult, request: GenerationRequest, transport: Transport) -> pb.GenerationStats:
    return stats_to_proto(result.stats, request, seed=result.seed, expert_only_fallback=transport.expert_only_fallback,
                          tier_retries=transport.tier_retries)


def result_to_proto(result: GenerationResult, request: GenerationRequest, transport: Transport) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=result.text, token_ids=result.token_ids, sources=[PROTO_BY_SOURCE[s] for s in result.sources],
        finish_reason=PROTO_BY_FINISH[result.finish_reason], usage=usage_of(result),
        stats=stats_proto(result, request, transport),
    )


def chunk_to_proto(chunk: GenerationChunk, request: GenerationRequest, transport: Transport) -> pb.GenerateStreamResponse:
    message = pb.GenerateStreamResponse(
        text=chunk.text,
        segments=[pb.TextSegment(text=s.text, source=PROTO_BY_SOURCE[s.source]) for s in chunk.segments],
        token_ids=chunk.token_ids, sources=[PROTO_BY_SOURCE[s] for s in chunk.sources],
    )
    if chunk.result is not None:
        message.finish_reason = PROTO_BY_FINISH[chunk.result.finish_reason]
        message.usage.CopyFrom(usage_of(chunk.result))
        message.stats.CopyFrom(stats_proto(chunk.result, request, transport))
    return message
