"""The model tiers: `DrafterTier` proposes blocks, `ExpertTier` verifies them. One model per replica.

A call is one job: a draft call drafts its whole block inside the tier, a verify call scores and
verifies its block, and every call queued while the model was busy runs in the next batch, its
math included (`engine.jobs`: the same functions the in-process roles run). Calls carry only what
changed in their session's sequence (`wire.py`) and are fast by affinity: the replica keeps a cache
and the token sequence per session id (`SessionStore`), and the router sends a session's calls to
the same replica (`affinity.SessionAffinityRouter`). A replica that does not hold a call's base
sequence answers `needs_context` and gets the whole sequence, so correctness never depends on
which replica answers. A new prompt is prefilled in chunks between batches (`batching.py`).

A session has one live call per tier: a newer one (the router's retry after a timeout, or a draft
replacing a dropped pre-draft) supersedes the older, which is dropped or, drafting, stops at its
next step (`batching.py`). Session ends are ordered with the passes: a release ends the session at
once (queued calls are dropped, a draft in progress stops at its next step) and frees its cache on
the forward thread between batches, never under a pass, even if its caller stops waiting first. A
call for an ended session is answered as cancelled: its request is over and nobody reads the answer
(see `sessions.py`). Sessions whose router vanished are reclaimed after `session_idle_timeout_s` by
a periodic sweep.

Each answer reports where the call's time went (queued, forward passes, deciding), which the
router counts per round (`engine.stats`).

The classes are plain; `app.build_app` turns them into deployments with options from config.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..autoscale.signals import TIER_BUSY_SECONDS, TIER_CALLS, TIER_IN_FLIGHT
from ..config.app import TierConfig
from ..engine.backends import ScoreJob, load_backend
from ..engine.blocks import CallReport
from ..engine.jobs import (
    PREFILL_THRESHOLD,
    DraftJob,
    VerifyJob,
    WorkTimes,
    context_to_cache,
    draft_blocks,
    verify_blocks_on,
)
from .batching import ContinuousBatcher, Prefill, Progress, Queued, SupersededError
from .cpu_turns import CpuTurns, cpu_spin_count
from .direct import DirectServer
from .heap import (
    ProcessStats,
    describe_allocator,
    kernel_cache_entries,
    page_faults,
    prepare_allocator,
    replica_process_stats,
    trim_heap,
)
from .logs import log_to_replica_file
from .metrics import TierMetrics
from .sessions import CacheStats, SessionEndedError, SessionEntry, SessionStore
from .wire import GRPC_MESSAGE_BYTES, DraftCall, DraftReply, Endpoint, VerifyCall, VerifyReply

log = logging.getLogger(__name__)

MAX_SWEEP_PERIOD_S = 30.0  # idle sessions are looked for (and the heap trimmed) at least this often
DRAIN_POLL_S = 0.1  # a stopping replica looks this often whether its sessions have ended
DRAIN_CLOSE_GRACE_S = 1.0  # then the calls still on its direct channel have this long to finish


@dataclass(frozen=True)
class ReplicaStats:
    """One tier replica's process and caches (for soak tests and operators)."""

    process: ProcessStats
    cache: CacheStats


@dataclass(frozen=True)
class Work:
    """A call's job, as the batcher queues it."""

    session_id: str
    entry: SessionEntry
    job: Any  # DraftJob or VerifyJob

    @property
    def context(self) -> Sequence[int]:
        return context_to_cache(self.job)


class ModelTier:
    def __init__(self, config: TierConfig, role: str, *, direct: bool = False):
        """`direct`: answer the router's calls on this replica's own TCP endpoint too, after Serve
        has placed a session here (`direct.py`)."""
        from transformers import AutoTokenizer

        from ..models import resolve_model

        log_to_replica_file()
        self.allocator = prepare_allocator(config.allocator, field=f"{role}.allocator")
        self.config = config
        self.role = role
        if config.cpu_affinity:
            try:
                os.sched_setaffinity(0, config.cpu_affinity)
            except OSError as error:
                raise ValueError(f"{role}.cpu_affinity={config.cpu_affinity}: this machine's cores are "
                                 f"{sorted(os.sched_getaffinity(0))} ({error})") from None
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        # Opened before the model loads, so a bad path fails at once.
        turns = CpuTurns(config.cpu_lock_file, field=f"{role}.cpu_lock_file") if config.cpu_lock_file else None
        resolved = resolve_model(config.model, progress=False)
        vocab_size = len(AutoTokenizer.from_pretrained(resolved.path))
        self.backend = load_backend(config.backend, resolved.path, dtype=config.dtype, device=config.device,
                                    name=resolved.source, vocab_size=vocab_size, **config.backend_options())
        if turns is not None:
            self.backend.pass_guard = turns
        self.sessions = SessionStore(self.backend, budget_mb=config.kv_cache_budget_mb,
                                     idle_timeout_s=config.session_idle_timeout_s)
        self.metrics = TierMetrics(role)
        self.calls = 0  # draft / verify calls served, for autoscaling
        self.in_flight = 0  # calls queued or running now, however they came (autoscaling's queue floor)
        self.batcher = ContinuousBatcher(
            self._run_batch, max_batch_size=config.max_batch_size, name=role, ended=self._ended,
            prefill=Prefill(self._pending_context, self._prefill, PREFILL_THRESHOLD, config.prefill_chunk_tokens,
                            config.prefill_pass_prompts, live=self.sessions.live),
            session_of=lambda work: work.session_id, turns=turns, holds=self._holds)
        self._sweeper: asyncio.Task | None = None
        self.direct = DirectServer(self, message_bytes=GRPC_MESSAGE_BYTES) if direct else None
        self.endpoint: Endpoint | None = None  # the direct channel's, once open
        self.kernel_cache = kernel_cache_entries()
        self.cpu_spin = cpu_spin_count()
        log.info("%s tier loaded %s (%s backend, %s, %s%s, %d threads, %s, CPU kernel cache %s, OpenMP spin %s%s)",
                 role, resolved.source, config.backend, self.backend.dtype, self.backend.device,
                 f", {self.backend.onednn_linears} linear layers on oneDNN ({self.backend.packed_linears} in its blocked "
                 "layout)" if self.backend.onednn_linears else "",
                 torch.get_num_threads(), describe_allocator(config.allocator, self.allocator),
                 "at the libraries' default" if self.kernel_cache is None else f"{self.kernel_cache} entries",
                 "libgomp's default" if self.cpu_spin is None else self.cpu_spin,
                 f", passes take turns on {config.cpu_lock_file}" if config.cpu_lock_file else "")

    # ---- the forward thread ----

    def _ended(self, work: Work) -> Exception | None:
        return self.sessions.refuse_late(work.session_id) if self.sessions.is_ended(work.session_id) else None

    def _holds(self, session_id: str) -> bool:
        return session_id in self.sessions and not self.sessions.is_ended(session_id)

    def _pending_context(self, work: Work) -> int:
        """Context tokens the call's step would run that the cache does not hold (read from the event
        loop while the forward thread may be moving the cache: an estimate, which only decides
        whether the call is prefilled in chunks first)."""
        return len(work.context) - work.job.session.cached_length

    def _prefill(self, works: list[Work], budget: int, share: int) -> list[bool]:
        """One pass caching the next context tokens of the calls, `budget` tokens in all, in order,
        at most `share` to each (the batcher's choice); for each call, True once all of its context
        is cached. A call whose session ended meanwhile gets nothing (the batcher drops it)."""
        jobs, done, fed = [], [], 0
        for work in works:
            context, session = work.context, work.job.session
            cached = min(session.cached_length, len(context))
            amount = min(budget - fed, share)
            end = cached if self.sessions.is_ended(work.session_id) else min(len(context), cached + amount)
            if end > cached:
                jobs.append(ScoreJob(session, context[:end], end))  # keeps the distribution after `end`
                fed += end - cached
            done.append(end == len(context))
        if jobs:
            started = time.perf_counter()
            self.backend.score(jobs)
            self.metrics.observe_prefill(fed, time.perf_counter() - started)
            self.metrics.observe_steps(self.backend.steps, self.backend.slot_evictions)
        return done

    def _run_batch(self, batch: list[Queued]) -> list[tuple[Any, WorkTimes] | Exception]:
        """One batch of jobs on the forward thread (all draft jobs, or all verify jobs)."""
        started = time.perf_counter()
        works = [queued.item for queued in batch]
        jobs = [work.job for work in works]
        if isinstance(jobs[0], DraftJob):
            # A draft stops at its next step when its session ends, or when its caller gave up on it
            # (a block drafted ahead that the verdict made useless).
            results, times = draft_blocks(self.backend, jobs, ended=lambda index: (
                batch[index].future.done() or self.sessions.is_ended(works[index].session_id)))
        else:
            results, times = verify_blocks_on(self.backend, jobs)
        self.metrics.observe_batch(len(jobs), time.perf_counter() - started)
        self.metrics.observe_steps(self.backend.steps, self.backend.slot_evictions)
        # Never a session a call waits for: evicted, a prompt waiting for its prefill chunks would go on
        # filling a cache the replica no longer holds nor counts, and its next call would send it all again.
        self.sessions.evict_to_budget(keep=frozenset(work.session_id for work in works) | self.batcher.sessions_waiting())
        return [(result, times) if result is not None else
                asyncio.CancelledError() if queued.future.done() else self.sessions.refuse_late(work.session_id)
                for queued, work, result in zip(batch, works, results)]

    # ---- calls (the replica's event loop) ----

    async def _serve(self, session_id: str, share, delta, make_job):
        """Run a call's job in the next batch: (result, report), or None when the replica does not
        hold the sequence the call builds on. A session ended before or during the call ends it
        as cancelled (one access-log line, no traceback: its request was cancelled or is over)."""
        self._start_sweeper()
        if self.direct is not None and self.endpoint is None:
            try:
                self.endpoint = await self.direct.endpoint()
            except OSError as error:  # the channel is a shortcut: without it, calls come through Serve
                log.warning("%s replica: its direct channel could not open (%s); the router calls it through "
                            "Serve", self.role, error)
                self.direct = None
        self.calls += 1
        self.in_flight += 1
        try:
            entry = self.sessions.entry(session_id)
            if not entry.known.apply(delta):
                self.metrics.context_resends.inc(tags=self.metrics.tags)
                return None
            (result, times), queued = await self.batcher.submit(Work(session_id, entry, make_job(entry)), share)
        except (SessionEndedError, SupersededError) as ended:
            log.debug("%s call stopped: %s", self.role, ended)
            raise asyncio.CancelledError(str(ended)) from None
        finally:
            self.in_flight -= 1
        waited = max(0.0, time.perf_counter() - queued.enqueued_at - times.forward_s - times.decide_s)
        return result, CallReport(queued_s=max(0.0, waited - queued.prefill_s),
                                  forward_s=times.forward_s + queued.prefill_s, decide_s=times.decide_s,
                                  wall_s=time.perf_counter() - queued.enqueued_at)

    async def release(self, session_id: str) -> bool:
        """End the session (request finished or cancelled): drop its queued calls now, free its
        cache after the pass in progress, and refuse its later calls. True if this replica held a
        cache for it."""
        self._start_sweeper()
        self.sessions.end(session_id)
        self.batcher.wake()
        # Shielded: a caller that stops waiting (its call timed out behind a long pass, its connection
        # dropped) must not take the free off the forward thread's queue. The session refuses calls
        # from now on, so nothing but the idle sweep would free its cache after that.
        return await asyncio.shield(self.batcher.run_between_batches(self.sessions.free, session_id))

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        """Reclaim sessions untouched for `session_idle_timeout_s` (their router may have died), and
        trim the heap, between batches; export the session caches' statistics."""
        period = min(self.sessions.idle_timeout_s / 4, MAX_SWEEP_PERIOD_S)
        while True:
            await asyncio.sleep(period)
            reclaimed = await self.batcher.run_between_batches(self.sessions.reclaim_idle)
            if self.allocator == "glibc":  # jemalloc and tcmalloc return unused pages themselves
                await self.batcher.run_between_batches(trim_heap)
            self.metrics.observe_cache(self.sessions.stats())
            if reclaimed:
                log.info("%s tier reclaimed %d session cache(s) idle for over %gs (router gone or request "
                         "stalled)", self.role, reclaimed, self.sessions.idle_timeout_s)

    # ---- operations ----

    async def drain(self) -> int:
        """Serve's shutdown hook (`app.served_tier`: scale-down, upgrade, deletion), run once the
        calls Serve routed here have finished. With direct calls the sessions held here keep calling
        this replica straight, past Serve, which no longer routes to it: it answers them until each
        has ended (released by its router) or `drain_timeout_s` has passed, then closes its direct
        channel; a session still running then fails over to Serve and moves, its new replica
        recomputing its cache. Through Serve alone the sessions' next calls already go elsewhere:
        nothing to wait for. Returns the sessions still live when it stopped waiting."""
        if self.direct is None:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        live = self.sessions.live()
        if live:
            log.info("%s replica stopping: answering its %d session(s) until they end, at most %gs",
                     self.role, len(live), self.config.drain_timeout_s)
        while (live or self.in_flight) and loop.time() < deadline:
            await asyncio.sleep(min(DRAIN_POLL_S, max(0.0, deadline - loop.time())))
            live = self.sessions.live()
        if live:
            log.warning("%s replica stopping after %gs with %d session(s) still running: they move to another "
                        "replica, which recomputes their caches", self.role, self.config.drain_timeout_s, len(live))
        await self.direct.stop(DRAIN_CLOSE_GRACE_S)
        return len(live)

    async def cache_stats(self) -> CacheStats:
        return self.sessions.stats()

    async def cached_sessions_by_tenant(self) -> dict[str, int]:
        return self.sessions.tenants()

    async def replica_stats(self) -> ReplicaStats:
        """This replica's process (id, resident memory, allocator) and cache stats."""
        return ReplicaStats(replica_process_stats(self.allocator), self.sessions.stats())

    async def progress(self) -> Progress:
        """Whether this replica's model is getting through its work (answered by the event loop,
        whatever the forward thread is doing)."""
        return self.batcher.progress()

    async def batch_stats(self) -> dict[str, int | float | str]:
        """Forward passes and the calls they served since start (mean batch size is the ratio);
        `forward_calls` counts every model call, batched or not, prefill chunks included;
        `page_faults`: the replica process's page faults since it started (each large tensor the
        allocator maps afresh is faulted in page by page: `bench serve` counts them per round);
        `allocator`: the C allocator the process runs on; `kernel_cache`: the compiled CPU kernels
        each cache keeps (-1: the libraries' default, not set by the replica's environment);
        `cpu_spin`: how many times its idle OpenMP threads spin before they sleep (-1: libgomp's
        default); `direct_calls`: calls that reached it over its direct channel rather than
        through Serve (`direct.py`); `steps_graph`, `steps_eager`, `steps_wide`, `steps_uncaptured`:
        forward passes by how they ran (`engine.backends.base.STEP_KINDS`); `slot_evictions`: sessions
        that lost their static-backend slot to another's."""
        return {"batches": self.metrics.batches, "batched_requests": self.metrics.batched_requests,
                "forward_calls": self.backend.forward_calls, "page_faults": page_faults(),
                "allocator": self.allocator, "kernel_cache": -1 if self.kernel_cache is None else self.kernel_cache,
                "cpu_spin": -1 if self.cpu_spin is None else self.cpu_spin,
                "direct_calls": self.direct.calls if self.direct is not None else 0,
                "busy_s": self.metrics.busy_seconds,
                "turn_gathers": self.batcher.gathers, "turn_gather_ms": self.batcher.gather_s * 1e3,
                **{f"steps_{how}": count for how, count in self.backend.steps.items()},
                "slot_evictions": self.backend.slot_evictions}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook for custom autoscaling metrics: calls served and forward-pass seconds
        since the replica started (cumulative), and the calls it holds now (see
        `speccascade.autoscale.signals`)."""
        return {TIER_CALLS: float(self.calls), TIER_BUSY_SECONDS: self.metrics.busy_seconds,
                TIER_IN_FLIGHT: float(self.in_flight)}


class DrafterTier(ModelTier):
    def __init__(self, config: TierConfig, *, direct: bool = False):
        super().__init__(config, "drafter", direct=direct)

    async def draft(self, call: DraftCall) -> DraftReply:
        """Draft `call.gamma` tokens after the session's context, one model step each, in one job
        with every other session's draft in the batch; `call.share` says whose work it is."""
        answer = await self._serve(call.session_id, call.share, call.delta, lambda entry: DraftJob(
            entry.session, list(entry.known.tokens), call.gamma, call.sampling, call.seed, call.payload))
        return DraftReply(*(answer or (None,)), endpoint=self.endpoint)


class ExpertTier(ModelTier):
    def __init__(self, config: TierConfig, *, direct: bool = False):
        super().__init__(config, "expert", direct=direct)

    async def verify(self, call: VerifyCall) -> VerifyReply:
        """Score the session's sequence (context + the drafted block from `call.start`) and verify
        the block, in one batch with every other session's verify. An empty block (expert-only
        decoding) just samples the next token."""
        answer = await self._serve(call.session_id, call.share, call.delta, lambda entry: VerifyJob(
            entry.session, list(entry.known.tokens), call.start, call.block, call.rule, call.alpha, call.sampling,
            call.seed, call.logprobs, call.prompt_logprobs))
        return VerifyReply(*(answer or (None,)), endpoint=self.endpoint)
