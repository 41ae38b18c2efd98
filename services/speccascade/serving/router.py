"""The router core: what every protocol front-end calls. No protocol here.

`RouterCore.admit` identifies the caller (API key), builds and checks its request under its
policy, and takes its quota ticket; `RouterCore.serve_request` waits for a decoding slot in fair
order and streams the request's chunks, decoded by the engine's loop over the tiers (`stream`).
The gRPC and HTTP front-ends (`speccascade.frontends`) map requests into these calls and the
outcomes to their status codes: a bad request raises ValueError naming the field, tenancy's
refusals raise TenancyError, a tier with no replica TierUnavailableError.

It holds no model, only the pair's tokenizer (`models.PairInfo`). Each request gets a session id;
the remote roles (`clients.py`) tag every tier call with it (replica affinity, the replica's
cache), so a retried call on another replica recomputes, with the same random draws
(`engine.seeding`). A request whose client goes away is cancelled: the loop stops at its next
await and both tiers free the session's caches.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing, suppress
from dataclasses import dataclass

from ..autoscale import signals as autoscale_signals
from ..config.app import AppConfig, CascadePolicy, TenancyConfig
from ..engine.generation import GenerationChunk, TextGeneration
from ..engine.request import GenerationRequest
from ..engine.stats import RoundRecord
from ..models import PairInfo
from ..status_board import PIPELINE, TENANT_LOAD, StatusPoster
from ..tenancy import Admission, TenancyError
from ..tenancy.fairness import Share
from ..tenancy.gatekeeper import Caller, Gatekeeper
from .clients import RemoteDrafter, RemoteExpert, TierClient, TierUnavailableError, Transport, tier_handle
from .direct import Route
from .metrics import RouterMetrics, WindowCounters, metric_tags
from .quota_ledger import SharedQuotas
from .resume import ResumeSigner, StreamTokens, application_key

log = logging.getLogger(__name__)

# A router replica posts its per-tenant load (`speccascade status`) this long after it changed, and
# at least every TENANT_LOAD_PERIOD_S without a change (the board drops posts of replicas gone).
TENANT_LOAD_SETTLE_S = 0.5
TENANT_LOAD_PERIOD_S = 5.0


@dataclass(frozen=True)
class Admitted:
    """A request the router let in: who it runs for, what it decodes, and its quota ticket."""

    caller: Caller
    request: GenerationRequest
    prompt: list[int]
    limit: int  # new tokens that fit the context window
    admission: Admission | None  # None: the caller has no quotas
    tags: dict[str, str]  # its metric labels
    resume: StreamTokens  # its chunks' resume tokens (and, for a resumed stream, the output delivered before)

    def resume_token(self, chunk: GenerationChunk) -> str:
        """The resume token of the next chunk of this request's stream."""
        return self.resume.after(chunk.token_ids)


class PipeliningState:
    """The router's sessions by what pipelining does for them now (`speccascade status` shows it),
    and the pre-drafts made and used since start."""

    def __init__(self) -> None:
        self.sessions: dict[str, str] = {}
        self.made = 0
        self.used = 0

    def observe(self, session_id: str, record: RoundRecord) -> None:
        if record.pipeline:
            self.sessions[session_id] = record.pipeline
        self.made += record.predrafts
        self.used += record.predrafts_used

    def forget(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def summary(self) -> dict:
        states: dict[str, int] = {}
        for state in self.sessions.values():
            states[state] = states.get(state, 0) + 1
        return {"sessions": states, "predrafts": self.made, "predrafts_used": self.used}


class RouterCore:
    def __init__(self, drafter, expert, config: AppConfig):
        self.config = config
        self.policy = config.policy
        pair = PairInfo.load(config.drafter.model, config.expert.model, progress=False)
        window = min(tier.sequence_limit(pair.context_window) for tier in (config.drafter, config.expert))
        self.generation = TextGeneration(pair.tokenizer, eos_ids=pair.eos_ids, context_window=window)
        self.metrics = RouterMetrics()
        self.window = WindowCounters()
        self.window_totals = autoscale_signals.CumulativeCounters(autoscale_signals.ROUTER_COUNTERS)
        self.drafter = TierClient(tier_handle(drafter, config.router), tier="drafter", config=config.router,
                                  metrics=self.metrics)
        self.expert = TierClient(tier_handle(expert, config.router), tier="expert", config=config.router,
                                 metrics=self.metrics)
        self._background: set[asyncio.Task] = set()
        self.active_sessions: set[str] = set()
        self.shared_quotas = self._shared_quotas(config.tenancy)
        self.access = Gatekeeper(config.tenancy, config.policy, shared_quotas=self.shared_quotas)
        self._load_publisher: asyncio.Task | None = None
        self._load_changed = asyncio.Event()
        self._tenant_reloader: asyncio.Task | None = None
        self.pipelining = PipeliningState()
        self.signer = ResumeSigner(application_key(config.router))

    def _shared_quotas(self, tenancy: TenancyConfig) -> SharedQuotas | None:
        """The application's quota ledger, when quotas are counted for the application and this
        runs as a Serve replica (a router built outside Serve, in a unit test, counts alone)."""
        if tenancy.tenants_file is None or tenancy.quota_scope != "application":
            return None
        try:
            from ray import serve

            app_name = serve.get_replica_context().app_name
        except Exception:
            return None
        return SharedQuotas(app_name, tenancy, self.metrics)

    def start(self) -> None:
        """Start the replica's clock-driven work, on the running event loop: the tenants file is
        looked at every `tenancy.reload_period_s`, with or without traffic (`close` stops it)."""
        if self.access.open or self._tenant_reloader is not None:
            return

        def count(result: str) -> None:
            self.metrics.tenant_reloads.inc(tags={"result": result})

        self._tenant_reloader = asyncio.get_running_loop().create_task(self.access.reload_forever(count))

    async def connect(self) -> None:
        """Reach what admissions depend on before the replica takes requests: the application's
        quota ledger, when quotas are counted for the application."""
        if self.shared_quotas is not None:
            await self.shared_quotas.connect()

    def close(self) -> None:
        """Cancel the replica's background tasks (the tenants file's reloads, the load posts); the
        sessions' releases in flight finish on their own."""
        for task in (self._tenant_reloader, self._load_publisher):
            if task is not None and not task.done() and not task.get_loop().is_closed():
                task.cancel()
        self._tenant_reloader = self._load_publisher = None
        if self.shared_quotas is not None:
            self.shared_quotas.close()

    # ---- admission: who calls, what they ask for, their quota (errors here are the client's) ----

    async def admit(self, metadata: Iterable[tuple[str, str]],
                    build: Callable[[CascadePolicy], GenerationRequest], resume_token: str | None = None) -> Admitted:
        """What every protocol calls first: the caller (API key in `metadata`: gRPC metadata or HTTP
        headers), its request built under its policy by `build` (the protocol's mapping), the
        prompt's tokens and the caller's quota ticket. Raises TenancyError (refusals by tenancy) or
        ValueError (a bad request, naming the field); both are counted here.

        `resume_token`: the request continues a stream that broke off (`serving.resume`); the
        token must verify, be the caller's, and belong to this request (it brings the seed)."""
        self._publish_tenant_load()
        tags = metric_tags(None)
        try:
            caller = self.access.identify(metadata)
            tags = metric_tags(None, caller.id)
            point = None
            if resume_token:
                point = self.signer.verify(resume_token)
                point.check_caller(caller.id)
            request = build(self.access.policy_for(caller))
            if point is not None:
                request = point.apply(request)
            prompt, limit = self.generation.prepare(request)
            tags = metric_tags(request, caller.id)
            self.access.check(caller, request)
            tokens = StreamTokens(self.signer, caller.id, request, point)
            admitted = Admitted(caller, request, prompt, limit, await self.access.admit(caller), tags, tokens)
            self._load_changed.set()
            if point is not None:
                self.metrics.resumed.inc(tags={"tenant": caller.id})
            return admitted
        except TenancyError as error:
            self.metrics.rejections.inc(tags={"tenant": tags["tenant"], "reason": error.reason})
            self.metrics.requests.inc(tags={**tags, "code": error.status})
            raise
        except ValueError:
            self.metrics.requests.inc(tags={**tags, "code": "INVALID_ARGUMENT"})
            raise

    def identify(self, metadata: Iterable[tuple[str, str]]) -> Caller:
        """The caller alone, for calls that decode nothing (the HTTP API's model list)."""
        try:
            return self.access.identify(metadata)
        except TenancyError as error:
            self.metrics.rejections.inc(tags={"tenant": "", "reason": error.reason})
            raise

    # ---- decoding over the tiers ----

    async def stream(self, request: GenerationRequest, prompt: list[int], limit: int, caller: Caller = Caller(None),
                     delivered: tuple[int, ...] = ()) -> AsyncIterator[tuple[GenerationChunk, Transport]]:
        """Like `CascadeEngine.astream`, over the tiers. The last chunk carries the result;
        `delivered`: the output a broken-off stream of the request delivered, to continue after.

        The session id, which keys both tiers' caches, starts with the tenant's id and is made
        here, never taken from a request: no tenant can name another's cache."""
        session_id = f"{caller.id or '-'}/{uuid.uuid4().hex}"
        self.active_sessions.add(session_id)
        transport = Transport()
        tags = metric_tags(request, caller.id)
        drafter, expert = self.roles(session_id, transport, tag=tags["rule"], share=caller.share)
        observers = (self.window.observe, lambda record: self.metrics.observe(record, tags),
                     lambda record: self.pipelining.observe(session_id, record))
        chunks = self.generation.stream_rounds(request, prompt, limit, drafter, expert, observers, delivered)
        try:
            async for chunk in chunks:
                if chunk.result is not None:
                    self.metrics.observe_output(chunk.result.stats, tags)
                yield chunk, transport
        finally:
            try:
                await chunks.aclose()
            finally:  # whatever closing the loop raised, the tiers free the session
                self._release(session_id, drafter=drafter.route, expert=expert.route)

    def roles(self, session_id: str, transport: Transport, *, tag: str,
              share: Share) -> tuple[RemoteDrafter, RemoteExpert]:
        """One request's drafter and expert over the tiers. Where the tiers' passes take turns on
        shared cores, its drafter says it cannot overlap the expert (auto pipelining stays off)."""
        return (RemoteDrafter(self.drafter, session_id, transport, tag=tag, share=share,
                              overlaps_expert=not self.config.tiers_take_turns),
                RemoteExpert(self.expert, session_id, transport, tag=tag, share=share))

    async def serve_request(self, admitted: Admitted) -> AsyncIterator[tuple[GenerationChunk, Transport]]:
        """An admitted request decoded in its fair turn, its output charged to its quota, its
        outcome and latencies counted: what every protocol calls after `admit`. Raises
        TierUnavailableError when the expert tier is down."""
        caller, request, admission, tags = admitted.caller, admitted.request, admitted.admission, admitted.tags
        started = time.perf_counter()
        first_token = True
        try:
            async with self.access.decoding_slot(caller, request):
                self._load_changed.set()
                async with aclosing(self.stream(request, admitted.prompt, admitted.limit, caller,
                                                admitted.resume.delivered)) as chunks:
                    async for chunk, transport in chunks:
                        if admission is not None:
                            admission.charge(len(chunk.token_ids))
                        if first_token and chunk.token_ids:
                            first_token = False
                            self.metrics.first_token_seconds.observe(time.perf_counter() - started, tags=tags)
                        yield chunk, transport
        except TierUnavailableError:
            self.metrics.requests.inc(tags={**tags, "code": "UNAVAILABLE"})
            raise
        finally:
            if admission is not None:
                admission.release()
            self._load_changed.set()
        self.metrics.request_seconds.observe(time.perf_counter() - started, tags=tags)
        self.metrics.requests.inc(tags={**tags, "code": "OK"})

    def _release(self, session_id: str, *, drafter: Route, expert: Route) -> None:
        """Free the session in both tiers, in the background: this also runs while the request's
        own task is being cancelled, and must not wait on the tiers.

        The release runs in a fresh context, outside the request's Serve context: calls made in a
        request's context are its children, and Serve cancels a cancelled request's children that
        are still being routed or running, the release among them; its session would then stay
        cached in the tier until the idle timeout."""
        self.active_sessions.discard(session_id)
        self.pipelining.forget(session_id)

        async def release(tier: TierClient, route: Route):
            try:
                await asyncio.wait_for(tier.release(route), self.config.router.tier_call_timeout_s)
            except Exception as error:  # the tier is down: its caches went with it, or its idle sweep frees them
                log.info("releasing session %s on the %s tier failed: %r", session_id, tier.tier, error)

        async def release_both():
            await asyncio.gather(release(self.drafter, drafter), release(self.expert, expert))

        task = asyncio.get_running_loop().create_task(release_both(), context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- operations ----

    async def serving(self) -> bool:
        """Whether the application can answer: the expert tier is required; without the drafter
        the service still answers (expert-only)."""
        return await self.expert.running_replicas() > 0

    def take_window(self) -> dict[str, float]:
        """The raw counters since the previous call (for autoscaling), and restart the window."""
        window = self.window.take().as_dict()
        self.window_totals.absorb(window)
        return window

    def autoscaling_stats(self) -> dict[str, float]:
        """The router's counters since it started (cumulative: what Serve's autoscaling hook reports)."""
        return self.window_totals.including(self.window.as_dict())

    def _publish_tenant_load(self) -> None:
        """From the first request on, TENANT_LOAD_SETTLE_S after each change and every
        TENANT_LOAD_PERIOD_S at least: this replica's per-tenant load on the application's status
        board, where `speccascade status` sums the replicas' posts. Posting after changes keeps a
        short request visible; the settling time bounds the posts under heavy churn to two a second."""
        if self._load_publisher is not None and not self._load_publisher.done():
            return
        try:
            from ray import serve

            context = serve.get_replica_context()
        except Exception:  # not running as a Serve replica (a unit test): nothing to post to
            return
        poster, replica = StatusPoster(context.app_name), context.replica_id.unique_id

        async def publish_forever():
            while True:
                self._load_changed.clear()  # a change from here on is posted next time
                await asyncio.to_thread(poster.post, TENANT_LOAD, replica, self.access.load())
                await asyncio.to_thread(poster.post, PIPELINE, replica, self.pipelining.summary())
                await asyncio.sleep(TENANT_LOAD_SETTLE_S)
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._load_changed.wait(), TENANT_LOAD_PERIOD_S - TENANT_LOAD_SETTLE_S)

        self._load_publisher = asyncio.get_running_loop().create_task(publish_forever())
