"""The two roles of the decoding loop, and their in-process implementations.

`DrafterRole.draft` proposes gamma tokens after a context; `ExpertRole.verify` scores a drafted
block in one pass and keeps what the rule accepts (an empty block: it just produces the next
token). Both calls carry everything needed to answer from scratch; a session cache only makes them
cheaper. Each answers with where its time went (`CallReport`), which the loop counts.

The in-process roles (`LocalDrafter`, `LocalExpert`) run the engine's batched work
(`engine.jobs`) on a batch of one; the tiers run the very same functions on every queued call of
their forward pass. Remote roles (the router's clients of the tiers) live in
`speccascade.serving.clients`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from ..options import Rule, SamplingParams
from .backends import BackendSession, ModelBackend
from .blocks import CallReport, DraftedBlock, DraftPayload, VerifyOutcome
from .jobs import DraftJob, VerifyJob, draft_blocks, verify_blocks_on


class DrafterRole(Protocol):
    # Whether the drafter computes apart from the loop (a tier: True): a draft sent before the
    # loop's caller takes a round then runs beside the caller's work. In-process (False) it would
    # only run before it, delaying the round.
    computes_apart: bool
    # Whether the drafter's passes can run while the expert's do (tiers on hardware of their own):
    # what a block drafted ahead needs to save anything (`PipelineGovernor`, auto).
    overlaps_expert: bool

    async def draft(self, context: Sequence[int], gamma: int, sampling: SamplingParams, seed: int,
                    payload: DraftPayload) -> tuple[DraftedBlock, CallReport]:
        """Draft gamma tokens after `context`, one model step each; the token at position n is drawn
        with the key (seed, n, draft). May return an empty block when no drafter can answer."""


class ExpertRole(Protocol):
    async def verify(self, sequence: Sequence[int], start: int, block: DraftedBlock, rule: Rule, alpha: float,
                     sampling: SamplingParams, seed: int, *, logprobs: int | None = None,
                     prompt_logprobs: int | None = None) -> tuple[VerifyOutcome, CallReport]:
        """Score `sequence` (context + the block drafted from `start`) and verify the block with the
        rule; draws use the key (seed, start, verify). `logprobs` (k): the outcome carries the emitted
        tokens' logprobs with the top k; `prompt_logprobs` (k): those of sequence[1:start] too."""

    async def prefill(self, prompt: Sequence[int], rule: Rule, alpha: float, sampling: SamplingParams,
                      seed: int) -> CallReport | None:
        """Cache `prompt` ahead of the first verify, while the drafter drafts the first block: an
        expert with compute of its own (a tier) works through the prompt meanwhile. Returns what it
        cost, or None where nothing was sent (in-process the first verify prefills)."""


class _Local:
    def __init__(self, backend: ModelBackend, session: BackendSession | None = None):
        self.backend = backend
        self.session = session if session is not None else backend.new_session()

    def release(self) -> None:
        self.backend.release(self.session)


class LocalDrafter(_Local):
    """The drafter role on a backend session in this process."""

    computes_apart = False
    overlaps_expert = False  # one process runs one pass at a time

    async def draft(self, context, gamma, sampling, seed, payload) -> tuple[DraftedBlock, CallReport]:
        started = time.perf_counter()
        (block,), work = draft_blocks(self.backend, [DraftJob(self.session, context, gamma, sampling, seed, payload)])
        return block, CallReport(forward_s=work.forward_s, decide_s=work.decide_s, wall_s=time.perf_counter() - started)


class LocalExpert(_Local):
    """The expert role on a backend session in this process."""

    async def verify(self, sequence, start, block, rule, alpha, sampling, seed, *, logprobs=None,
                     prompt_logprobs=None) -> tuple[VerifyOutcome, CallReport]:
        started = time.perf_counter()
        (outcome,), work = verify_blocks_on(self.backend, [VerifyJob(
            self.session, sequence, start, block, rule, alpha, sampling, seed, logprobs, prompt_logprobs)])
        return outcome, CallReport(forward_s=work.forward_s, decide_s=work.decide_s,
                                  wall_s=time.perf_counter() - started)

    async def prefill(self, prompt, rule, alpha, sampling, seed) -> None:
        return None  # one process, one model at a time: nothing would run beside the draft
