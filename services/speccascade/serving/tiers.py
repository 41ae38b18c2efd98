"""The model tiers: `DrafterTier` proposes blocks, `ExpertTier` verifies them. One model per replica.

Calls are stateless for correctness (each carries the whole token sequence) and fast by
affinity: the replica keeps a cache per session id (`SessionStore`), and the router sends a
session's calls to the same replica (`affinity.SessionAffinityRouter`). The call bodies are the
engine's (`engine.roles`); here they score through a `ContinuousBatcher`, which gathers concurrent
sessions' scoring steps into one backend pass.

Session ends are ordered with the passes: a release runs on the forward thread between batches, so
it never frees a cache under a pass, and every scoring step after it finds the session ended. A
call for an ended session (one the release overtook) stops at its next step and is answered as
cancelled: its request is over and nobody reads the answer (see `sessions.py`). Sessions whose
router vanished are reclaimed after `session_idle_timeout_s` by a periodic sweep.

The classes are plain; `app.build_app` turns them into deployments with options from config.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ..autoscale.signals import TIER_BUSY_SECONDS, TIER_CALLS
from ..config.app import TierConfig
from ..engine.backends import ScoreJob, load_backend
from ..engine.blocks import DraftedBlock, DraftPayload, VerifyOutcome
from ..engine.roles import ScoreFn, draft_block, verify_drafted
from ..options import Rule, SamplingParams
from ..tenancy.fairness import DEFAULT_SHARE, Share
from .batching import ContinuousBatcher
from .heap import pin_mmap_threshold, trim_heap
from .logs import log_to_replica_file
from .metrics import TierMetrics
from .sessions import CacheStats, SessionEndedError, SessionStore

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_SWEEP_PERIOD_S = 30.0  # idle sessions are looked for (and the heap trimmed) at least this often


@dataclass(frozen=True)
class ReplicaStats:
    """One tier replica's process and caches (for soak tests and operators)."""

    replica_id: str
    pid: int
    rss_bytes: int  # resident memory of the replica's process
    cache: CacheStats


@dataclass(frozen=True)
class _ScoreRequest:
    session_id: str
    tokens: Sequence[int]
    start: int


class ModelTier:
    def __init__(self, config: TierConfig, role: str):
        from transformers import AutoTokenizer

        from ..models import resolve_model

        log_to_replica_file()
        pin_mmap_threshold()
        self.config = config
        self.role = role
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        resolved = resolve_model(config.model, progress=False)
        vocab_size = len(AutoTokenizer.from_pretrained(resolved.path))
        self.backend = load_backend(config.backend, resolved.path, dtype=config.dtype, device=config.device,
                                    name=resolved.source, vocab_size=vocab_size, **config.backend_options())
        self.sessions = SessionStore(self.backend, budget_mb=config.kv_cache_budget_mb,
                                     idle_timeout_s=config.session_idle_timeout_s)
        self.metrics = TierMetrics(role)
        self.calls = 0  # draft / verify calls served, for autoscaling
        self.batcher = ContinuousBatcher(self._forward, max_batch_size=config.max_batch_size,
                                         wait_s=config.batch_wait_timeout_s, name=role)
        self._sweeper: asyncio.Task | None = None
        log.info("%s tier loaded %s (%s backend, %s, %s, %d threads)", role, resolved.source, config.backend,
                 config.dtype, self.backend.device, torch.get_num_threads())

    def _forward(self, requests: list[_ScoreRequest]) -> list[torch.Tensor | SessionEndedError]:
        """One batched backend pass (on the batcher's thread). A request whose session has ended
        gets `SessionEndedError` and no share of the pass."""
        started = time.perf_counter()
        results: list[torch.Tensor | SessionEndedError | None] = [None] * len(requests)
        live: dict[int, ScoreJob] = {}
        for i, r in enumerate(requests):
            try:
                live[i] = ScoreJob(self.sessions.get(r.session_id), r.tokens, r.start)
            except SessionEndedError as ended:
                results[i] = ended
        if live:
            for i, rows in zip(live, self.backend.score(list(live.values()))):
                results[i] = rows
            self.metrics.observe_batch(len(live), time.perf_counter() - started)
            self.sessions.evict_to_budget(keep=frozenset(requests[i].session_id for i in live))
        return results  # type: ignore[return-value]

    def _scorer(self, session_id: str, share: Share) -> ScoreFn:
        async def score(tokens: Sequence[int], start: int) -> torch.Tensor:
            """[len(tokens) - start + 1, V] next-token distributions (temperature 1)."""
            return await self.batcher.submit(_ScoreRequest(session_id, tokens, start), share)

        return score

    async def _served(self, session_id: str, body: Callable[[], Awaitable[T]]) -> T:
        """Run a draft / verify call body; a session ended before or during the call ends it as
        cancelled (one access-log line, no traceback: its request was cancelled or is over)."""
        self._start_sweeper()
        try:
            self.sessions.check_live(session_id)
            return await body()
        except SessionEndedError as ended:
            log.debug("%s call stopped: %s", self.role, ended)
            raise asyncio.CancelledError(str(ended)) from None

    async def release(self, session_id: str) -> bool:
        """End the session (request finished or cancelled): free its cache after the pass in
        progress and refuse its later calls. True if this replica held a cache for it."""
        self._start_sweeper()
        return await self.batcher.run_between_batches(self.sessions.release, session_id)

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
            await self.batcher.run_between_batches(trim_heap)
            self.metrics.observe_cache(self.sessions.stats())
            if reclaimed:
                log.info("%s tier reclaimed %d session cache(s) idle for over %gs (router gone or request "
                         "stalled)", self.role, reclaimed, self.sessions.idle_timeout_s)

    async def cache_stats(self) -> CacheStats:
        return self.sessions.stats()

    async def cached_sessions_by_tenant(self) -> dict[str, int]:
        return self.sessions.tenants()

    async def replica_stats(self) -> ReplicaStats:
        """This replica's id, process id, resident memory and cache stats."""
        import psutil
        from ray import serve

        return ReplicaStats(serve.get_replica_context().replica_id.unique_id, os.getpid(),
                            psutil.Process().memory_info().rss, self.sessions.stats())

    async def batch_stats(self) -> dict[str, int]:
        """Forward passes and the scoring requests they served since start (mean batch size is
        the ratio); `forward_calls` counts every model call, batched or not."""
        return {"batches": self.metrics.batches, "batched_requests": self.metrics.batched_requests,
                "forward_calls": self.backend.forward_calls}


    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook for custom autoscaling metrics: calls served and forward-pass seconds
        since the replica started (cumulative; see `speccascade.autoscale.signals`)."""
        return {TIER_CALLS: float(self.calls), TIER_BUSY_SECONDS: self.metrics.busy_seconds}


class DrafterTier(ModelTier):
    def __init__(self, config: TierConfig):
        super().__init__(config, "drafter")

    async def draft(self, session_id: str, context: np.ndarray, gamma: int, sampling: SamplingParams, seed: int,
                    payload: DraftPayload, share: Share = DEFAULT_SHARE) -> DraftedBlock:
        """Draft `gamma` tokens after `context` ([n] int32), one model step each; `share` says whose
        work it is (batch forming is fair across tenants)."""
        self.calls += 1
        block = await self._served(session_id, lambda: draft_block(
            self._scorer(session_id, share), context.tolist(), gamma, sampling, seed, payload))
        return block.to("cpu")


class ExpertTier(ModelTier):
    def __init__(self, config: TierConfig):
        super().__init__(config, "expert")

    async def verify(self, session_id: str, sequence: np.ndarray, start: int, block: DraftedBlock, rule: Rule,
                     alpha: float, sampling: SamplingParams, seed: int, share: Share = DEFAULT_SHARE) -> VerifyOutcome:
        """Score `sequence` ([n] int32: context + the drafted block starting at `start`) and verify
        the block. An empty block (expert-only decoding) just samples the next token."""
        self.calls += 1
        return await self._served(session_id, lambda: verify_drafted(
            self._scorer(session_id, share), sequence.tolist(), start, block, rule, alpha, sampling, seed,
            self.backend.vocab_size))
