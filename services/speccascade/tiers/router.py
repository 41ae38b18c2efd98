"""The router: gRPC ingress of the application and the draft-then-verify loop over the tiers.

It holds no model, only the tokenizer. Each request gets a session id; every tier call carries
it (for replica affinity and the replica's KV cache) plus everything needed to answer from
scratch, so a retried call on another replica recomputes and gives the same answer. Random draws
come from per-round seeds (`wire.round_seed`), so a retry redraws the same numbers.

gRPC status codes: INVALID_ARGUMENT for a bad request (the message names the field),
UNAVAILABLE when the expert tier has no running replica, CANCELLED / DEADLINE_EXCEEDED from the
client side, which cancels this coroutine: the loop stops at its next await and both tiers free
the session's caches. With the drafter tier down, requests are decoded expert-only and say so
in their stats.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2
from ray import serve
from ray.exceptions import RayActorError

from ..api.v1 import speccascade_pb2 as pb
from ..autoscale import signals as autoscale_signals
from ..cascade import Rule
from ..cascade.rules import mixture_defers
from ..engine.engine import GenerationChunk, GenerationResult, StreamAssembler
from ..engine.prompt import encode_prompt, generation_limit
from ..engine.request import GenerationRequest
from ..engine.stats import GenerationStats, Source
from ..engine.text import OutputBuilder, eos_token_ids
from .config import AppConfig, RouterConfig
from .convert import PROTO_BY_FINISH, PROTO_BY_SOURCE, request_from_proto, stats_to_proto, usage_of
from .metrics import RouterMetrics, WindowCounters
from .wire import DraftedBlock, DraftPayload, Role, VerifyOutcome, encode_tokens, round_seed

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecCascade"].full_name
HEALTH_CACHE_S = 2.0  # how long a tier-health answer is reused (it asks the Serve controller)
HEALTH_WATCH_PERIOD_S = 5.0
SCALAR_BYTES = 8  # gamma, start, seed, alpha...: a few scalars per call
EMPTY_BLOCK = DraftedBlock(tokens=encode_tokens([]), max_q=np.zeros(0, dtype=np.float32))


class TierUnavailableError(RuntimeError):
    """A tier has no healthy replica. (Message-only, so it pickles across Ray.)"""

    @classmethod
    def of(cls, tier: str, reason: str) -> "TierUnavailableError":
        return cls(f"the {tier} tier has no healthy replica: {reason}")


@dataclass
class ServingStats:
    """What the distributed path adds to `GenerationStats`."""

    expert_only_fallback: bool = False
    tier_retries: int = 0
    wire_bytes: int = 0
    context_bytes: int = 0


class TierClient:
    """Calls one tier with session affinity, a timeout, retries, and a health verdict."""

    def __init__(self, handle, *, tier: str, config: RouterConfig, metrics: RouterMetrics):
        self.handle = handle
        self.tier = tier
        self.deployment = handle.deployment_name
        self.app_name = handle.app_name
        self.config = config
        self.metrics = metrics
        self._down_until = 0.0
        self._health: tuple[float, int] | None = None  # (checked at, running replicas)

    async def running_replicas(self) -> int:
        now = time.monotonic()
        if self._health is None or now - self._health[0] > HEALTH_CACHE_S:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(self.app_name)
            deployment = app.deployments.get(self.deployment) if app else None
            states = deployment.replica_states if deployment else {}
            running = sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")
            self._health = (now, running)
        return self._health[1]

    async def call(self, method: str, session_id: str, *args, rule: str, serving: ServingStats):
        if time.monotonic() < self._down_until:
            raise TierUnavailableError.of(self.tier, "it was found without running replicas moments ago")
        last_error: BaseException | None = None
        for attempt in range(self.config.tier_call_attempts):
            if attempt:
                serving.tier_retries += 1
                self.metrics.tier_retries.inc(tags={"tier": self.tier})
            started = time.perf_counter()
            response = getattr(self.handle.options(multiplexed_model_id=session_id), method).remote(session_id, *args)
            try:
                result = await asyncio.wait_for(response, self.config.tier_call_timeout_s)
            except RayActorError as error:  # the replica died: retry, another one recomputes
                log.warning("%s call %s failed (attempt %d): %s", self.tier, method, attempt + 1, error)
                last_error = error
                continue
            except TimeoutError as error:
                last_error = error
                if await self.running_replicas() == 0:
                    self._down_until = time.monotonic() + self.config.tier_down_cooldown_s
                    raise TierUnavailableError.of(
                        self.tier, f"deployment {self.deployment!r} has no running replica "
                                   f"(a {method} call waited {self.config.tier_call_timeout_s:g}s)"
                    ) from error
                continue
            self.metrics.tier_call_seconds.observe(time.perf_counter() - started,
                                                   tags={"tier": self.tier, "rule": rule})
            return result
        raise TierUnavailableError.of(
            self.tier, f"{self.config.tier_call_attempts} attempts of {method} failed; last: {last_error!r}")

    def release(self, session_id: str):
        return self.handle.options(multiplexed_model_id=session_id).release.remote(session_id)


class Router:
    def __init__(self, drafter, expert, config: AppConfig):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from ..engine.sources import check_same_tokenizer, resolve_model

        self.config = config
        self.policy = config.policy
        drafter_model = resolve_model(config.drafter.model, progress=False)
        expert_model = resolve_model(config.expert.model, progress=False)
        self.tokenizer = AutoTokenizer.from_pretrained(expert_model.path)
        check_same_tokenizer(AutoTokenizer.from_pretrained(drafter_model.path), self.tokenizer,
                             drafter_name=drafter_model.source, expert_name=expert_model.source)
        try:
            generation_config = GenerationConfig.from_pretrained(expert_model.path)
        except OSError:
            generation_config = None
        self.eos_ids = eos_token_ids(self.tokenizer, generation_config)
        windows = [getattr(AutoConfig.from_pretrained(m.path), "max_position_embeddings", None) or 1 << 30
                   for m in (drafter_model, expert_model)]
        self.context_window = int(min(windows))
        self.metrics = RouterMetrics()
        self.window = WindowCounters()
        self.window_totals = autoscale_signals.CumulativeCounters(
            autoscale_signals.ROUTER_COUNTERS + autoscale_signals.ROUTER_CALL_COUNTERS)
        self.drafter = TierClient(drafter, tier="drafter", config=config.router, metrics=self.metrics)
        self.expert = TierClient(expert, tier="expert", config=config.router, metrics=self.metrics)
        self._background: set[asyncio.Task] = set()
        self.active_sessions: set[str] = set()

    # ---- request preparation (errors here are the client's: INVALID_ARGUMENT) ----

    def prepare(self, message: pb.GenerateRequest) -> tuple[GenerationRequest, list[int], int]:
        request = request_from_proto(message, self.policy)
        prompt = encode_prompt(self.tokenizer, request)
        return request, prompt, generation_limit(self.context_window, len(prompt), request)

    # ---- the loop ----

    async def _rounds(self, session_id: str, prompt: list[int], request: GenerationRequest,
                      stats: GenerationStats, serving: ServingStats) -> AsyncIterator[list[tuple[int, Source]]]:
        tokens = list(prompt)
        rule, alpha, gamma, sampling = request.rule, request.alpha, request.block_size, request.sampling
        payload = DraftPayload.for_request(rule, sampling)
        tag = rule.value
        for round_index in range(1 << 62):
            stats.rounds += 1
            self.window.rounds += 1
            if rule is Rule.CHOW:
                self.window.skippable_rounds += 1
            context = encode_tokens(tokens)
            block = EMPTY_BLOCK
            if not serving.expert_only_fallback:
                started = time.perf_counter()
                try:
                    block = await self.drafter.call(
                        "draft", session_id, context, gamma, sampling,
                        round_seed(request.seed, round_index, Role.DRAFT), payload, rule=tag, serving=serving)
                except TierUnavailableError as error:
                    log.warning("decoding expert-only: %s", error)
                    serving.expert_only_fallback = True
                    self.metrics.fallbacks.inc(tags={"rule": tag})
                else:
                    seconds = time.perf_counter() - started
                    stats.drafter_seconds += seconds
                    stats.drafter_passes += gamma
                    stats.drafted += gamma
                    self.window.drafter_calls += 1
                    self.window.drafter_service_seconds += seconds
                    self.window.drafted_positions += gamma
                    serving.wire_bytes += context.nbytes + SCALAR_BYTES * 3 + block.nbytes()
                    serving.context_bytes += context.nbytes
            drafted = block.tokens.tolist()
            if rule is Rule.CHOW and drafted:
                # chow decides from max q alone, so [gamma, 1] rows of max q decide like full q.
                deferred = mixture_defers(Rule.CHOW, torch.from_numpy(block.max_q).unsqueeze(-1), None, alpha)
                if not bool(deferred.any()):
                    stats.skipped_blocks += 1
                    stats.accepted += len(drafted)
                    self.window.skipped_blocks += 1
                    self.window.accepted_tokens += len(drafted)
                    tokens += drafted
                    yield [(t, Source.DRAFTER) for t in drafted]
                    continue
            sequence = encode_tokens(tokens + drafted)
            started = time.perf_counter()
            outcome: VerifyOutcome = await self.expert.call(
                "verify", session_id, sequence, len(tokens), block, rule, alpha, sampling,
                round_seed(request.seed, round_index, Role.VERIFY), rule=tag, serving=serving)
            seconds = time.perf_counter() - started
            stats.expert_seconds += seconds
            stats.expert_passes += 1
            self.window.expert_calls += 1
            self.window.expert_service_seconds += seconds
            serving.wire_bytes += sequence.nbytes + SCALAR_BYTES * 4 + block.nbytes() + VerifyOutcome.NBYTES
            serving.context_bytes += sequence.nbytes - block.tokens.nbytes
            stats.accepted += outcome.num_accepted
            stats.deferred += outcome.num_deferred
            self.window.accepted_tokens += outcome.num_accepted
            self.window.deferred_positions += outcome.num_deferred
            if outcome.is_bonus:
                stats.bonus += 1
            else:
                stats.corrected += 1
            kept = drafted[: outcome.num_accepted]
            tokens += kept + [outcome.next_token]
            yield [(t, Source.DRAFTER) for t in kept] + [(outcome.next_token, Source.EXPERT)]

    async def stream(self, request: GenerationRequest, prompt: list[int], limit: int
                     ) -> AsyncIterator[tuple[GenerationChunk, ServingStats]]:
        """Like `CascadeEngine.stream`, over the tiers. The last chunk carries the result."""
        session_id = uuid.uuid4().hex
        self.active_sessions.add(session_id)
        started = time.perf_counter()
        stats, serving = GenerationStats(), ServingStats()
        output = OutputBuilder(self.tokenizer, eos_ids=self.eos_ids, max_new_tokens=limit, stop=request.stop)
        assembler = StreamAssembler(output, stats)
        rounds = self._rounds(session_id, prompt, request, stats, serving)
        try:
            async for emitted in rounds:
                if assembler.absorb(emitted):
                    break
                yield assembler.chunk(), serving
        finally:
            await rounds.aclose()
            stats.wall_seconds = time.perf_counter() - started
            self._release(session_id)
            self._record(request, stats, serving)
        yield assembler.final_chunk(prompt_tokens=len(prompt), seed=request.seed), serving

    def _release(self, session_id: str) -> None:
        """Free the session in both tiers, in the background: this also runs while the request's
        own task is being cancelled, and must not wait on the tiers."""
        self.active_sessions.discard(session_id)

        async def release_both():
            for tier in (self.drafter, self.expert):
                try:
                    await asyncio.wait_for(tier.release(session_id), self.config.router.tier_call_timeout_s)
                except Exception as error:  # the tier is down: its caches went with it, or LRU frees them
                    log.info("releasing session %s on the %s tier failed: %r", session_id, tier.tier, error)

        task = asyncio.get_running_loop().create_task(release_both())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _record(self, request: GenerationRequest, stats: GenerationStats, serving: ServingStats) -> None:
        tags = {"rule": request.rule.value}
        for counter, value in ((self.metrics.rounds, stats.rounds), (self.metrics.drafted, stats.drafted),
                               (self.metrics.accepted, stats.accepted), (self.metrics.deferred, stats.deferred),
                               (self.metrics.expert_passes, stats.expert_passes),
                               (self.metrics.skipped_blocks, stats.skipped_blocks),
                               (self.metrics.wire_bytes, serving.wire_bytes)):
            if value:
                counter.inc(value, tags=tags)
        for source, value in ((Source.DRAFTER, stats.tokens_from_drafter), (Source.EXPERT, stats.tokens_from_expert)):
            if value:
                self.metrics.output_tokens.inc(value, tags={**tags, "source": source.value})

    # ---- gRPC methods (named like the RPCs; Serve's gRPC proxy calls them) ----

    def _invalid(self, context, error: ValueError):
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details(str(error))
        self.metrics.requests.inc(tags={"rule": "", "code": "INVALID_ARGUMENT"})

    def _unavailable(self, context, error: TierUnavailableError, rule: str):
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(str(error))
        self.metrics.requests.inc(tags={"rule": rule, "code": "UNAVAILABLE"})

    async def Generate(self, message: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            request, prompt, limit = self.prepare(message)
        except ValueError as error:
            self._invalid(grpc_context, error)
            raise
        try:
            async for chunk, serving in self.stream(request, prompt, limit):
                if chunk.result is not None:
                    self.metrics.requests.inc(tags={"rule": request.rule.value, "code": "OK"})
                    return result_to_proto(chunk.result, serving)
        except TierUnavailableError as error:
            self._unavailable(grpc_context, error, request.rule.value)
            raise
        raise RuntimeError("generation stream ended without a result")  # unreachable by construction

    async def GenerateStream(self, message: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            request, prompt, limit = self.prepare(message)
        except ValueError as error:
            self._invalid(grpc_context, error)
            raise
        try:
            async for chunk, serving in self.stream(request, prompt, limit):
                yield chunk_to_proto(chunk, serving)
        except TierUnavailableError as error:
            self._unavailable(grpc_context, error, request.rule.value)
            raise
        self.metrics.requests.inc(tags={"rule": request.rule.value, "code": "OK"})

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


def stats_proto(result: GenerationResult, serving: ServingStats) -> pb.GenerationStats:
    return stats_to_proto(result.stats, seed=result.seed, expert_only_fallback=serving.expert_only_fallback,
                          tier_retries=serving.tier_retries, wire_bytes=serving.wire_bytes,
                          context_bytes=serving.context_bytes)


def result_to_proto(result: GenerationResult, serving: ServingStats) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=result.text, token_ids=result.token_ids, sources=[PROTO_BY_SOURCE[s] for s in result.sources],
        finish_reason=PROTO_BY_FINISH[result.finish_reason], usage=usage_of(result),
        stats=stats_proto(result, serving),
    )


def chunk_to_proto(chunk: GenerationChunk, serving: ServingStats) -> pb.GenerateStreamResponse:
    message = pb.GenerateStreamResponse(
        text=chunk.text,
        segments=[pb.TextSegment(text=s.text, source=PROTO_BY_SOURCE[s.source]) for s in chunk.segments],
        token_ids=chunk.token_ids, sources=[PROTO_BY_SOURCE[s] for s in chunk.sources],
    )
    if chunk.result is not None:
        message.finish_reason = PROTO_BY_FINISH[chunk.result.finish_reason]
        message.usage.CopyFrom(usage_of(chunk.result))
        message.stats.CopyFrom(stats_proto(chunk.result, serving))
    return message
