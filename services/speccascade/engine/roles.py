"""The two roles of the decoding loop, and their in-process implementations.

`DrafterRole.draft` proposes gamma tokens after a context; `ExpertRole.verify` scores a drafted block in
one pass and keeps what the rule accepts (an empty block: it just produces the next token). Both
calls carry everything needed to answer from scratch; a session cache only makes them cheaper.

`draft_block` and `verify_drafted` are the bodies of those calls over a scoring function; the
in-process roles (`LocalDrafter`, `LocalExpert`) call them on a backend session, and the tiers
call them on their batched scorer. Remote roles (the router's clients of the tiers) live in
`speccascade.serving.clients`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from ..cascade import Rule, SamplingParams, adjust_probs, sample, verify_block
from .backends import BackendSession, ModelBackend
from .blocks import DraftedBlock, DraftPayload, VerifyOutcome, densify, summarize_draft
from .seeding import Purpose, draw_generator

# (tokens, start) -> [len(tokens) - start + 1, V] next-token distributions (temperature 1).
ScoreFn = Callable[[Sequence[int], int], Awaitable[Tensor]]


class DrafterRole(Protocol):
    async def draft(self, context: Sequence[int], gamma: int, sampling: SamplingParams, seed: int,
                    payload: DraftPayload) -> DraftedBlock:
        """Draft gamma tokens after `context`, one model step each; the token at position n is drawn
        with the key (seed, n, draft). May return an empty block when no drafter can answer."""


class ExpertRole(Protocol):
    async def verify(self, sequence: Sequence[int], start: int, block: DraftedBlock, rule: Rule, alpha: float,
                     sampling: SamplingParams, seed: int) -> VerifyOutcome:
        """Score `sequence` (context + the block drafted from `start`) and verify the block with the
        rule; draws use the key (seed, start, verify)."""


async def draft_block(score: ScoreFn, context: Sequence[int], gamma: int, sampling: SamplingParams, seed: int,
                      payload: DraftPayload) -> DraftedBlock:
    greedy = sampling.is_greedy
    sequence = list(context)
    q_rows: list[Tensor] = []
    sample_rows: list[Tensor] = []
    for _ in range(gamma):
        q = (await score(sequence, len(sequence)))[0]  # [V]
        if greedy:
            token = int(q.argmax())
        else:
            q_sample = adjust_probs(q, sampling)
            sample_rows.append(q_sample)
            generator = draw_generator(seed, len(sequence), Purpose.DRAFT, q.device)
            token = int(sample(q_sample, generator, greedy=False))
        q_rows.append(q)
        sequence.append(token)
    return summarize_draft(sequence[len(context):], torch.stack(q_rows),
                           None if greedy else torch.stack(sample_rows), payload)


async def verify_drafted(score: ScoreFn, sequence: Sequence[int], start: int, block: DraftedBlock, rule: Rule,
                         alpha: float, sampling: SamplingParams, seed: int, vocab_size: int) -> VerifyOutcome:
    p = await score(sequence, start)  # [gamma + 1, V]
    q, q_sample = densify(block, vocab_size, p.device)
    verdict = verify_block(
        rule, alpha, torch.tensor(block.tokens, dtype=torch.long, device=p.device), q, p, sampling,
        draw_generator(seed, start, Purpose.VERIFY, p.device), q_sample=q_sample,
    )
    return VerifyOutcome(verdict.num_accepted, verdict.next_token, verdict.is_bonus, verdict.num_deferred)


class _Local:
    def __init__(self, backend: ModelBackend, session: BackendSession | None = None):
        self.backend = backend
        self.session = session if session is not None else backend.new_session()

    async def _score(self, tokens: Sequence[int], start: int) -> Tensor:
        return self.backend.distributions(self.session, tokens, start)

    def release(self) -> None:
        self.backend.release(self.session)


class LocalDrafter(_Local):
    """The drafter role on a backend session in this process."""

    async def draft(self, context, gamma, sampling, seed, payload) -> DraftedBlock:
        return await draft_block(self._score, context, gamma, sampling, seed, payload)


class LocalExpert(_Local):
    """The expert role on a backend session in this process."""

    async def verify(self, sequence, start, block, rule, alpha, sampling, seed) -> VerifyOutcome:
        return await verify_drafted(self._score, sequence, start, block, rule, alpha, sampling, seed,
                                    self.backend.vocab_size)
