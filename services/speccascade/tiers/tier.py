"""The model tiers: `Drafter` proposes blocks, `Expert` verifies them. One model per replica.

Calls are stateless for correctness (each carries the whole token sequence) and fast by
affinity: the replica keeps a cache per session id (`SessionStore`), and the router sends a
session's calls to the same replica (`affinity.SessionAffinityRouter`). The call bodies are the
engine's (`engine.roles`); here they score through a `ContinuousBatcher`, which gathers concurrent
sessions' scoring steps into one backend pass.

The classes are plain; `app.build_app` turns them into deployments with options from config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..autoscale.signals import TIER_BUSY_SECONDS, TIER_CALLS
from ..cascade import Rule, SamplingParams
from ..engine.backends import ScoreJob, load_backend
from ..engine.blocks import DraftedBlock, DraftPayload, VerifyOutcome
from ..engine.roles import ScoreFn, draft_block, verify_drafted
from ..tenancy.fairness import DEFAULT_SHARE, Share
from .batching import ContinuousBatcher
from .config import TierConfig
from .metrics import TierMetrics
from .sessions import CacheStats, SessionStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ScoreRequest:
    session_id: str
    tokens: Sequence[int]
    start: int


class ModelTier:
    def __init__(self, config: TierConfig, role: str):
        from transformers import AutoTokenizer

        from ..engine.sources import resolve_model

        self.config = config
        self.role = role
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        resolved = resolve_model(config.model, progress=False)
        vocab_size = len(AutoTokenizer.from_pretrained(resolved.path))
        self.backend = load_backend(config.backend, resolved.path, dtype=config.dtype, device=config.device,
                                    name=resolved.source, vocab_size=vocab_size, **config.backend_options())
        self.sessions = SessionStore(self.backend, budget_mb=config.kv_cache_budget_mb)
        self.metrics = TierMetrics(role)
        self.calls = 0  # draft / verify calls served, for autoscaling
        self.batcher = ContinuousBatcher(self._forward, max_batch_size=config.max_batch_size,
                                         wait_s=config.batch_wait_timeout_s, name=role)
        log.info("%s tier loaded %s (%s backend, %s, %s, %d threads)", role, resolved.source, config.backend,
                 config.dtype, self.backend.device, torch.get_num_threads())

    def _forward(self, requests: list[_ScoreRequest]) -> list[torch.Tensor]:
        """One batched backend pass (on the batcher's thread)."""
        started = time.perf_counter()
        jobs = [ScoreJob(self.sessions.get(r.session_id), r.tokens, r.start) for r in requests]
        rows = self.backend.score(jobs)
        self.metrics.observe_batch(len(requests), time.perf_counter() - started)
        self.sessions.evict_to_budget(keep=frozenset(r.session_id for r in requests))
        return rows

    def _scorer(self, session_id: str, share: Share) -> ScoreFn:
        async def score(tokens: Sequence[int], start: int) -> torch.Tensor:
            """[len(tokens) - start + 1, V] next-token distributions (temperature 1)."""
            return await self.batcher.submit(_ScoreRequest(session_id, tokens, start), share)

        return score

    async def release(self, session_id: str) -> bool:
        """Free the session's cache (request finished or cancelled)."""
        return self.sessions.release(session_id)

    async def cache_stats(self) -> CacheStats:
        return self.sessions.stats()

    async def cached_sessions_by_tenant(self) -> dict[str, int]:
        return self.sessions.tenants()

    async def replica_cache_stats(self) -> tuple[str, CacheStats]:
        """(this replica's id, its cache stats): for seeing where sessions live."""
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id, self.sessions.stats()

    async def batch_stats(self) -> dict[str, int]:
        """Forward passes and the scoring requests they served since start (mean batch size is
        the ratio); `forward_calls` counts every model call, batched or not."""
        return {"batches": self.metrics.batches, "batched_requests": self.metrics.batched_requests,
                "forward_calls": self.backend.forward_calls}

    async def vocab_size(self) -> int:
        return self.backend.vocab_size

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook for custom autoscaling metrics: calls served and forward-pass seconds
        since the replica started (cumulative; see `speccascade.autoscale.signals`)."""
        return {TIER_CALLS: float(self.calls), TIER_BUSY_SECONDS: self.metrics.busy_seconds}


class Drafter(ModelTier):
    def __init__(self, config: TierConfig):
        super().__init__(config, "drafter")

    async def draft(self, session_id: str, context: np.ndarray, gamma: int, sampling: SamplingParams, seed: int,
                    payload: DraftPayload, share: Share = DEFAULT_SHARE) -> DraftedBlock:
        """Draft `gamma` tokens after `context` ([n] int32), one model step each; `share` says whose
        work it is (batch forming is fair across tenants)."""
        self.calls += 1
        block = await draft_block(self._scorer(session_id, share), context.tolist(), gamma, sampling, seed, payload)
        return block.to("cpu")


class Expert(ModelTier):
    def __init__(self, config: TierConfig):
        super().__init__(config, "expert")

    async def verify(self, session_id: str, sequence: np.ndarray, start: int, block: DraftedBlock, rule: Rule,
                     alpha: float, sampling: SamplingParams, seed: int, share: Share = DEFAULT_SHARE) -> VerifyOutcome:
        """Score `sequence` ([n] int32: context + the drafted block starting at `start`) and verify
        the block. An empty block (expert-only decoding) just samples the next token."""
        self.calls += 1
        return await verify_drafted(self._scorer(session_id, share), sequence.tolist(), start, block, rule, alpha,
                                    sampling, seed, self.backend.vocab_size)
