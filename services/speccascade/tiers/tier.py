"""The model tiers: `Drafter` proposes blocks, `Expert` verifies them. One model per replica.

Calls are stateless for correctness (each carries the whole token sequence) and fast by
affinity: the replica keeps a KV cache per session id (`SessionStore`), and the router sends a
session's calls to the same replica (`affinity.SessionAffinityRouter`). Concurrent calls are
scored together: every call is split into scoring steps (`_score`), which are gathered across
sessions into one forward pass (`batching.ContinuousBatcher` + `batched_forward.distributions_batch`).

The classes are plain; `app.build_app` turns them into deployments with options from config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..autoscale.signals import TIER_BUSY_SECONDS, TIER_CALLS
from ..cascade import Rule, SamplingParams, adjust_probs, sample, verify_block
from ..engine.runner import ModelRunner
from ..engine.sources import resolve_model
from .batched_forward import ScoreJob, distributions_batch
from .batching import ContinuousBatcher
from .config import TierConfig
from .metrics import TierMetrics
from .sessions import CacheStats, SessionStore
from .wire import DraftedBlock, DraftPayload, VerifyOutcome, densify, generator_for, summarize_draft

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ScoreRequest:
    session_id: str
    tokens: list[int]
    start: int


class ModelTier:
    def __init__(self, config: TierConfig, role: str):
        self.config = config
        self.role = role
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        resolved = resolve_model(config.model, progress=False)
        self.runner = ModelRunner.load(resolved.path, dtype=config.dtype, name=resolved.source)
        self.sessions = SessionStore(self.runner, budget_mb=config.kv_cache_budget_mb)
        self.metrics = TierMetrics(role)
        self.calls = 0  # draft / verify calls served, for autoscaling
        self.batcher = ContinuousBatcher(self._forward, max_batch_size=config.max_batch_size,
                                         wait_s=config.batch_wait_timeout_s, name=role)
        log.info("%s tier loaded %s (%s, %d threads)", role, resolved.source, config.dtype, torch.get_num_threads())

    def _forward(self, requests: list[_ScoreRequest]) -> list[torch.Tensor]:
        """One batched forward pass (on the batcher's thread)."""
        started = time.perf_counter()
        jobs = [ScoreJob(self.sessions.get(r.session_id), r.tokens, r.start) for r in requests]
        rows = distributions_batch(self.runner, jobs)
        self.metrics.observe_batch(len(requests), time.perf_counter() - started)
        self.sessions.evict_to_budget(keep=frozenset(r.session_id for r in requests))
        return rows

    async def _score(self, session_id: str, tokens: list[int], start: int) -> torch.Tensor:
        """[len(tokens) - start + 1, V] next-token distributions (temperature 1)."""
        return await self.batcher.submit(_ScoreRequest(session_id, tokens, start))

    async def release(self, session_id: str) -> bool:
        """Free the session's cache (request finished or cancelled)."""
        return self.sessions.release(session_id)

    async def cache_stats(self) -> CacheStats:
        return self.sessions.stats()

    async def replica_cache_stats(self) -> tuple[str, CacheStats]:
        """(this replica's id, its cache stats): for seeing where sessions live."""
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id, self.sessions.stats()

    async def batch_stats(self) -> dict[str, int]:
        """Forward passes and the scoring requests they served since start (mean batch size is
        the ratio); `forward_calls` counts every model call, batched or not."""
        return {"batches": self.metrics.batches, "batched_requests": self.metrics.batched_requests,
                "forward_calls": self.runner.forward_calls}

    async def vocab_size(self) -> int:
        return self.runner.vocab_size

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook for custom autoscaling metrics: calls served and forward-pass seconds
        since the replica started (cumulative; see `speccascade.autoscale.signals`)."""
        return {TIER_CALLS: float(self.calls), TIER_BUSY_SECONDS: self.metrics.busy_seconds}


class Drafter(ModelTier):
    def __init__(self, config: TierConfig):
        super().__init__(config, "drafter")

    async def draft(
        self, session_id: str, tokens: np.ndarray, gamma: int, sampling: SamplingParams, seed: int,
        payload: DraftPayload,
    ) -> DraftedBlock:
        """Draft `gamma` tokens after `tokens` ([n] int32), one model step each."""
        self.calls += 1
        context = tokens.tolist()
        generator = generator_for(seed)
        drafted: list[int] = []
        q_rows, sample_rows = [], []
        for _ in range(gamma):
            sequence = context + drafted
            q = (await self._score(session_id, sequence, len(sequence)))[0]  # [V]
            q_sample = adjust_probs(q, sampling)
            drafted.append(int(sample(q_sample, generator, greedy=sampling.is_greedy)))
            q_rows.append(q)
            sample_rows.append(q_sample)
        return summarize_draft(drafted, torch.stack(q_rows), torch.stack(sample_rows), payload)


class Expert(ModelTier):
    def __init__(self, config: TierConfig):
        super().__init__(config, "expert")

    async def verify(
        self, session_id: str, tokens: np.ndarray, start: int, block: DraftedBlock, rule: Rule,
        alpha: float, sampling: SamplingParams, seed: int,
    ) -> VerifyOutcome:
        """Score `tokens` ([n] int32: context + the drafted block starting at `start`) and verify the
        block. An empty block (expert-only decoding) just samples the next token."""
        self.calls += 1
        p = await self._score(session_id, tokens.tolist(), start)  # [gamma + 1, V]
        q, q_sample = densify(block, self.runner.vocab_size)
        verdict = verify_block(
            rule, alpha, torch.from_numpy(block.tokens.astype(np.int64)), q, p, sampling,
            generator_for(seed), q_sample=q_sample,
        )
        return VerifyOutcome(verdict.num_accepted, verdict.next_token, verdict.is_bonus, verdict.num_deferred)
