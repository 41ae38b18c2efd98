"""The router's side of the tiers: the drafter and expert roles of the decoding loop, answered by
remote tier replicas. They own what the network adds: session affinity, the slim calls (only what
changed in the sequence since the session's last call; the whole of it when a replica asks:
`wire.py`), timeouts, retries (a retry recomputes on whichever replica answers, with the same
draws), the tier-health verdict, and the expert-only fallback when the drafter tier is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ray import serve
from ray.exceptions import RayActorError

from ..config.app import RouterConfig
from ..engine.backends import common_prefix_length
from ..engine.blocks import EMPTY_BLOCK, TOKEN_BYTES, CallReport, DraftedBlock, DraftPayload, VerifyOutcome
from ..engine.jobs import PREFILL_THRESHOLD
from ..options import Rule, SamplingParams
from ..tenancy.fairness import DEFAULT_SHARE, Share
from .batching import Progress
from .direct import UNREACHABLE_COOLDOWN_S, DirectChannels, DirectUnavailableError, Route
from .metrics import RouterMetrics
from .replicas import running_count
from .wire import GRPC_MESSAGE_BYTES, DraftCall, Endpoint, SentTokens, VerifyCall

log = logging.getLogger(__name__)

HEALTH_CACHE_S = 2.0  # how long a tier-health answer is reused (it asks the Serve controller)


def tier_handle(handle, config: RouterConfig):
    """The router's handle to a tier over the configured transport: Serve's gRPC channel (the call's
    payload travels in its message; with `direct`, for a session's first call, which places it) or
    Ray actor calls (payloads over 100 KiB go through the object store)."""
    return handle.options(_by_reference=config.tier_transport == "ray")


async def _resolved(response):
    return await response


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


class TierUnavailableError(RuntimeError):
    """A tier has no healthy replica. (Message-only, so it pickles across Ray.)"""

    @classmethod
    def of(cls, tier: str, reason: str) -> "TierUnavailableError":
        return cls(f"the {tier} tier has no healthy replica: {reason}")


@dataclass
class Transport:
    """What serving one request over the tiers did besides decoding."""

    expert_only_fallback: bool = False
    tier_retries: int = 0
    context_resends: int = 0  # calls a replica asked to repeat with the whole sequence


class TierClient:
    """Calls one tier with session affinity, a timeout, retries, and a health verdict. With the
    direct transport, a session's calls go through Serve until one is answered, then straight to
    the replica that answered (its `Route`), until that replica cannot be reached."""

    def __init__(self, handle, *, tier: str, config: RouterConfig, metrics: RouterMetrics):
        self.handle = handle
        self.tier = tier
        self.deployment = handle.deployment_name
        self.app_name = handle.app_name
        self.config = config
        self.metrics = metrics
        self._down_until = 0.0
        self._health: tuple[float, int] | None = None  # (checked at, running replicas)
        self.direct = DirectChannels(message_bytes=GRPC_MESSAGE_BYTES) if config.tier_transport == "direct" else None
        self._unreachable: dict[Endpoint, float] = {}  # until when no session is bound to it

    async def running_replicas(self) -> int:
        now = time.monotonic()
        if self._health is None or now - self._health[0] > HEALTH_CACHE_S:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(self.app_name)
            deployment = app.deployments.get(self.deployment) if app else None
            running = running_count(deployment.replica_states) if deployment else 0
            self._health = (now, running)
        return self._health[1]

    def _request(self, route: Route, method: str, *args):
        """The call `method(*args)` for the session on `route`: to its replica's direct endpoint,
        or through Serve's handle (affinity by session id)."""
        if route.endpoint is not None:
            return self.direct.call(route.endpoint, method, *args)
        return getattr(self.handle.options(multiplexed_model_id=route.session_id), method).remote(*args)

    async def call(self, method: str, call, *, rule: str, transport: Transport, route: Route):
        if time.monotonic() < self._down_until:
            raise TierUnavailableError.of(self.tier, "it was found without running replicas moments ago")
        last_error: BaseException | None = None
        for attempt in range(self.config.tier_call_attempts):
            if attempt:
                transport.tier_retries += 1
                self.metrics.tier_retries.inc(tags={"tier": self.tier})
            started = time.perf_counter()
            response = self._request(route, method, call)
            try:
                result = await self._while_moving(method, route, response)
            except (RayActorError, TimeoutError, DirectUnavailableError) as error:
                # Died or stuck: retry through Serve; another replica recomputes.
                log.warning("%s call %s failed (attempt %d): %r", self.tier, method, attempt + 1, error)
                last_error = error
                if isinstance(error, DirectUnavailableError):
                    self._unreachable_now(route)
                route.endpoint = None
                continue
            self.metrics.tier_call_seconds.observe(time.perf_counter() - started,
                                                   tags={"tier": self.tier, "rule": rule})
            if self.direct is not None:
                self._bind(route, result.endpoint)
            return result
        raise TierUnavailableError.of(
            self.tier, f"{self.config.tier_call_attempts} attempts of {method} failed; last: {last_error!r}")

    def _unreachable_now(self, route: Route) -> None:
        """The session's replica could not be reached: its calls go through Serve again."""
        now = time.monotonic()
        self._unreachable = {endpoint: until for endpoint, until in self._unreachable.items() if until > now}
        self._unreachable[route.endpoint] = now + UNREACHABLE_COOLDOWN_S
        route.endpoint = None

    def _bind(self, route: Route, endpoint: Endpoint | None) -> None:
        """Send the session's next calls to `endpoint` (the replica that answered), unless it was
        found unreachable lately: a replica that died, or a port the router cannot reach."""
        if endpoint is not None and self._unreachable.get(endpoint, 0.0) <= time.monotonic():
            route.endpoint = endpoint  # (expired entries are dropped as new ones are added)

    async def _while_moving(self, method: str, route: Route, response):
        """The call's result. Each time `tier_call_timeout_s` passes without it, the replica is asked
        whether its model is still getting through work: a busy one (overloaded, or a long prompt
        ahead in its queue) keeps the call, since a retry would only queue it again at the back; one
        whose forward thread has been still that long, or that does not answer, is stuck
        (TimeoutError: retried). With no running replica at all the tier is unavailable."""
        timeout = self.config.tier_call_timeout_s
        answer = asyncio.ensure_future(_resolved(response))
        waited = 0.0
        try:
            while True:
                done, _ = await asyncio.wait({answer}, timeout=timeout)
                if done:
                    return answer.result()
                waited += timeout
                if await self.running_replicas() == 0:
                    self._down_until = time.monotonic() + self.config.tier_down_cooldown_s
                    raise TierUnavailableError.of(
                        self.tier, f"deployment {self.deployment!r} has no running replica (a {method} call "
                                   f"waited {waited:g}s)")
                progress = await self._progress(route)
                if progress is None:
                    raise TimeoutError(f"{method} call unanswered after {waited:g}s, and the replica did not "
                                       f"say within {timeout:g}s whether it is working")
                if not progress.moving(timeout):
                    raise TimeoutError(f"{method} call unanswered after {waited:g}s; the replica's model has run "
                                       f"no pass for {progress.still_s:.0f}s")
                self.metrics.tier_busy_waits.inc(tags={"tier": self.tier})
                log.info("%s call %s of session %s still queued after %gs; the replica is busy (%d calls "
                         "waiting), so it keeps its place", self.tier, method, route.session_id, waited,
                         progress.queued)
        finally:
            # A cancelled call ends as Serve's RequestCancelledError rather than as cancelled (its
            # handle turns the one into the other): retrieved here, so that it is not logged as an
            # exception nobody retrieved.
            answer.add_done_callback(_retrieve)
            if not answer.done():
                answer.cancel()
                response.cancel()

    async def _progress(self, route: Route) -> Progress | None:
        """The progress of the replica the session's calls go to; None if it does not answer in time."""
        try:
            async with asyncio.timeout(self.config.tier_call_timeout_s):
                return await self._request(route, "progress")
        except (TimeoutError, RayActorError, DirectUnavailableError):
            return None

    async def release(self, route: Route) -> bool:
        """End the session on the replica that holds it (through Serve, if that one is gone)."""
        try:
            return await self._request(route, "release", route.session_id)
        except DirectUnavailableError:
            self._unreachable_now(route)
            return await self._request(route, "release", route.session_id)


class _Remote:
    def __init__(self, tier: TierClient, session_id: str, transport: Transport, *, tag: str,
                 share: Share = DEFAULT_SHARE):
        self.tier, self.session_id, self.transport, self.tag, self.share = tier, session_id, transport, tag, share
        self.sent = SentTokens()  # what this session's tier holds
        self.route = Route(session_id)  # which replica holds it

    async def _exchange(self, method: str, sequence: Sequence[int], build, context_length: int):
        """Send the call `build(delta)` makes for `sequence`; once more with the whole sequence if
        the replica did not hold the one the delta builds on. Returns (reply, report)."""
        started = time.perf_counter()
        wire_bytes = 0
        for whole in (False, True):
            delta = self.sent.delta(sequence, whole=whole)
            # The tier applies a call's delta when the call arrives, before it answers: a call
            # cancelled on its way (a block drafted ahead, dropped) has still moved the tier on. One
            # that never arrived makes the next call's base unknown there, which asks for it whole.
            self.sent.sent(delta, sequence)
            call = build(delta)
            reply = await self.tier.call(method, call, rule=self.tag, transport=self.transport, route=self.route)
            wire_bytes += call.nbytes + reply.nbytes
            if not reply.needs_context:
                break
            self.transport.context_resends += 1
            self.tier.metrics.context_resends.inc(tags={"tier": self.tier.tier})
        else:
            raise RuntimeError(f"the {self.tier.tier} tier refused the whole sequence of session {self.session_id}")
        context_sent = max(0, context_length - delta.position)
        tier = reply.report
        report = CallReport(tier.queued_s, tier.forward_s, tier.decide_s, time.perf_counter() - started,
                            wire_bytes, TOKEN_BYTES * context_sent)
        return reply, report


class RemoteDrafter(_Remote):
    """The drafter role over the drafter tier, for one request. When the tier is down it answers
    with empty blocks, which the loop turns into expert steps (expert-only decoding)."""

    computes_apart = True

    def __init__(self, tier: TierClient, session_id: str, transport: Transport, *, tag: str,
                 share: Share = DEFAULT_SHARE, overlaps_expert: bool = True):
        super().__init__(tier, session_id, transport, tag=tag, share=share)
        self.overlaps_expert = overlaps_expert  # False where the tiers take turns on shared cores

    async def draft(self, context: Sequence[int], gamma: int, sampling: SamplingParams, seed: int,
                    payload: DraftPayload) -> tuple[DraftedBlock, CallReport]:
        if self.transport.expert_only_fallback:
            return EMPTY_BLOCK, CallReport()
        try:
            reply, report = await self._exchange("draft", context, lambda delta: DraftCall(
                self.session_id, delta, gamma, sampling, seed, payload, self.share), len(context))
        except TierUnavailableError as error:
            log.warning("decoding expert-only: %s", error)
            self.transport.expert_only_fallback = True
            self.tier.metrics.fallbacks.inc(tags={"rule": self.tag})
            return EMPTY_BLOCK, CallReport()
        return reply.block, report


class RemoteExpert(_Remote):
    """The expert role over the expert tier, for one request."""

    async def verify(self, sequence: Sequence[int], start: int, block: DraftedBlock, rule: Rule, alpha: float,
                     sampling: SamplingParams, seed: int, *, logprobs: int | None = None,
                     prompt_logprobs: int | None = None) -> tuple[VerifyOutcome, CallReport]:
        reply, report = await self._exchange("verify", sequence, lambda delta: VerifyCall(
            self.session_id, delta, start, block, rule, alpha, sampling, seed, self.share, logprobs,
            prompt_logprobs), start)
        return reply.outcome, report

    async def prefill(self, prompt: Sequence[int], rule: Rule, alpha: float, sampling: SamplingParams,
                      seed: int) -> CallReport | None:
        """A verify of an empty block after the prompt, sent while the drafter drafts: the tier
        prefills the prompt in chunks as it would for the first verify, now in its own turns beside
        the drafter's, and answers once it is cached (its answer, the expert's next token, is not
        used). The first verify then feeds just its block. A prompt the tier would not prefill
        apart (`PREFILL_THRESHOLD` tokens or fewer) is left to the first verify: prefilling it early
        would cost a pass of its own; so is a prompt the tier already holds (scored for its
        prompt logprobs), which would cost a call for nothing."""
        if len(prompt) - common_prefix_length(self.sent.tokens, prompt) <= PREFILL_THRESHOLD:
            return None
        _, report = await self._exchange("verify", prompt, lambda delta: VerifyCall(
            self.session_id, delta, len(prompt), EMPTY_BLOCK, rule, alpha, sampling, seed, self.share), len(prompt))
        return report
