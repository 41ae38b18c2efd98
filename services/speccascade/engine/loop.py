"""The decoding loop, written once: speculative cascades and the baselines they are measured
against, over a drafter role and an expert role (`roles.py`), in-process or served.

Each method is an async generator of `RoundRecord`s; a record carries the tokens the round emits
and everything it did, and is the only place decoding is counted. The caller decides when to stop
(EOS, length, stop strings) by closing the generator, so no loop does more than one round of
work past the end of the output.

A drafter that returns an empty block (its tier is down) turns any round into an expert step, so
every method degrades to expert-only decoding rather than failing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager

import torch

from ..cascade import Rule, sequence_cascade_defers, token_cascade_defers
from ..cascade.rules import mixture_defers
from ..options import Method
from .blocks import EMPTY_BLOCK, CallReport, DraftedBlock, DraftPayload, TokenLogprobs, VerifyOutcome
from .pipeline import PipelineGovernor
from .request import GenerationRequest
from .roles import DrafterRole, ExpertRole
from .stats import RoundRecord, Source

log = logging.getLogger(__name__)

Rounds = AsyncIterator[RoundRecord]

# The first block of a request's speculative rounds: its first token waits for the drafter's prefill
# (whose last row already drafts one token) and one expert pass, not for gamma - 1 drafter steps
# more and a (gamma + 1)-token verify. Every later block is `request.block_size` long.
FIRST_BLOCK_SIZE = 1


@contextmanager
def _timed(record: RoundRecord, field: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        setattr(record, field, getattr(record, field) + time.perf_counter() - started)


def _count_call(record: RoundRecord, tier: str, report: CallReport) -> None:
    for phase, seconds in (("queue", report.queued_s), ("forward", report.forward_s), ("decide", report.decide_s)):
        name = f"{tier}_{phase}_seconds"
        setattr(record, name, getattr(record, name) + seconds)
    record.transport_seconds += report.transport_s
    record.wire_bytes += report.wire_bytes
    record.context_bytes += report.context_bytes


async def _draft(drafter: DrafterRole, tokens: list[int], gamma: int, request: GenerationRequest,
                 payload: DraftPayload, record: RoundRecord, governor: PipelineGovernor | None = None) -> DraftedBlock:
    with _timed(record, "drafter_seconds"):
        block, report = await drafter.draft(tokens, gamma, request.sampling, request.seed, payload)
    return _drafted(record, block, report, governor)


def _drafted(record: RoundRecord, block: DraftedBlock, report: CallReport,
             governor: PipelineGovernor | None = None) -> DraftedBlock:
    """Count a draft call's block and report into the round that uses the block."""
    _count_call(record, "drafter", report)
    if governor is not None:
        governor.observe_draft_call(report)
    if block.gamma:
        record.drafter_calls += 1
        record.drafter_passes += block.gamma
        record.drafted += block.gamma
    return block


class _NextDraft:
    """The next round's block, drafted while the caller takes the round just done (streams its
    tokens, checks its stop conditions), rather than after: with a drafter that computes apart
    (a tier), the draft call goes out before the loop yields the round. It is the call the next
    round would make, after the same tokens, so it is the same block; a caller that stops there
    closes the loop, which cancels it (a drafter step or two of work past the end, on the drafter
    alone)."""

    def __init__(self, drafter: DrafterRole, tokens: list[int], request: GenerationRequest, payload: DraftPayload):
        self.task = asyncio.ensure_future(drafter.draft(list(tokens), request.block_size, request.sampling,
                                                        request.seed, payload))

    async def take(self, record: RoundRecord, governor: PipelineGovernor) -> DraftedBlock:
        with _timed(record, "drafter_seconds"):  # only the part the loop waits for
            block, report = await self.task
        return _drafted(record, block, report, governor)

    def cancel(self) -> None:
        self.task.cancel()
        self.task.add_done_callback(lambda task: task.cancelled() or task.exception())


async def _verify(expert: ExpertRole, tokens: list[int], block: DraftedBlock, rule: Rule, alpha: float,
                  request: GenerationRequest, record: RoundRecord) -> VerifyOutcome:
    """Verify `block` after `tokens`; records the outcome and emits its tokens into `record`."""
    sequence = tokens + list(block.tokens)
    with _timed(record, "expert_seconds"):
        outcome, report = await expert.verify(sequence, len(tokens), block, rule, alpha, request.sampling, request.seed,
                                              logprobs=request.logprobs)
    _count_call(record, "expert", report)
    record.expert_passes += 1
    record.accepted += outcome.num_accepted
    record.deferred += outcome.num_deferred
    if outcome.is_bonus:
        record.bonus += 1
    else:
        record.corrected += 1
    record.emitted += [(t, Source.DRAFTER) for t in block.tokens[: outcome.num_accepted]]
    record.emitted.append((outcome.next_token, Source.EXPERT))
    if outcome.logprobs is not None:  # one per emitted token, under its position's output distribution
        record.logprobs += outcome.logprobs.rows()
    return outcome


def _keep_drafted(record: RoundRecord, block: DraftedBlock) -> None:
    """Emit the whole block as the drafter's, with no expert call."""
    record.skipped_blocks += 1
    record.accepted += block.gamma
    record.emitted += [(t, Source.DRAFTER) for t in block.tokens]
    if block.logprob_chosen is not None:  # no position deferred: the output distribution is q
        record.logprobs += TokenLogprobs.of_block(block).rows()


def _chow_keeps(block: DraftedBlock, alpha: float) -> bool:
    # chow decides from max q alone, so [gamma, 1] rows of max q decide like full q.
    return not bool(mixture_defers(Rule.CHOW, torch.from_numpy(block.max_q).unsqueeze(-1), None, alpha).any())


class _Ahead:
    """A block drafted ahead, while the expert verifies `block` after `context`: gamma + 1 tokens
    after context + block (gamma: the request's block size), the first being the drafter's guess at
    the expert's bonus token. The token at position n is drawn with the key (seed, n, draft), as a
    draft after the verdict would draw it, so a used pre-draft is exactly the block that draft would
    have made."""

    def __init__(self, drafter: DrafterRole, context: list[int], block: DraftedBlock, request: GenerationRequest,
                 payload: DraftPayload):
        self.gamma = request.block_size  # the next block's (the one verified may be the shorter first)
        self.started = time.perf_counter()
        self.task = asyncio.ensure_future(drafter.draft(context + list(block.tokens), self.gamma + 1,
                                                        request.sampling, request.seed, payload))

    async def take(self, record: RoundRecord, outcome: VerifyOutcome, governor: PipelineGovernor
                   ) -> DraftedBlock | None:
        """The next block if the pre-draft hit (the whole block kept, the bonus token guessed),
        else None; counts it, and what it cost, into `record`: the round that uses or drops it (a
        request's last pre-draft, cut off by the request's end, has no such round and is not
        counted, so every counted one is used or wasted)."""
        record.predrafts += 1
        if not outcome.is_bonus and not self._ran():  # a rejection: the context is not the one drafted ahead of
            self.cancel(record)
            governor.observe_predraft(False)
            return None
        with _timed(record, "drafter_seconds"):  # only the part of the pre-draft the loop waits for
            try:
                ahead, report = await self.task
            except Exception:  # a pre-draft is optional: the next round drafts as usual
                log.debug("a pre-draft failed", exc_info=True)
                ahead, report = EMPTY_BLOCK, CallReport()
        _count_call(record, "drafter", report)
        governor.observe_draft_call(report)
        if ahead.gamma:
            record.drafter_calls += 1
            record.drafter_passes += ahead.gamma
        # A rejection's pre-draft that had already answered (or failed) is counted as it ran, then dropped.
        hit = outcome.is_bonus and ahead.gamma == self.gamma + 1 and ahead.tokens[0] == outcome.next_token
        governor.observe_predraft(hit)
        if not hit:
            record.predrafts_wasted += 1
            record.predraft_wasted_passes += ahead.gamma
            return None
        record.predrafts_used += 1
        record.drafted += self.gamma
        return ahead.after_first()

    def _ran(self) -> bool:
        """Its call is over: it answered or failed (not cancelled)."""
        return self.task.done() and not self.task.cancelled()

    def cancel(self, record: RoundRecord) -> None:
        """Drop the pre-draft before it answered (its tier call is cancelled; a step in progress
        finishes), counted as the most it could have cost."""
        self.task.cancel()
        record.predrafts_wasted += 1
        record.predraft_wasted_passes += self.gamma + 1


class _Prefill:
    """The expert caching the prompt while the drafter drafts the first block (`ExpertRole.prefill`);
    the first verify waits for it, so it never overtakes it (it would be the session's newer call),
    and then feeds only its block."""

    def __init__(self, expert: ExpertRole, prompt: list[int], request: GenerationRequest):
        self.task = asyncio.ensure_future(expert.prefill(list(prompt), request.rule, request.alpha, request.sampling,
                                                         request.seed))

    async def wait(self, record: RoundRecord) -> None:
        """Until the prompt is cached; counts what the prefill cost into `record`. A prefill that
        failed is only logged: the verify prefills (or fails) itself."""
        with _timed(record, "expert_seconds"):  # only the part the loop waits for
            try:
                report = await self.task
            except Exception:
                log.debug("an early prefill failed", exc_info=True)
                return
        if report is not None:
            _count_call(record, "expert", report)


async def speculative_rounds(drafter: DrafterRole, expert: ExpertRole, prompt: list[int], request: GenerationRequest,
                             limit: int, *, resumed: bool = False) -> Rounds:
    """Draft gamma tokens, score them with one expert pass, keep what the rule accepts. The first
    block is `FIRST_BLOCK_SIZE` tokens (the time to the first token), unless `resumed` (`prompt`
    ends with output already delivered: the stream goes on with full blocks, as it would have).
    The rule decides each position from that position's q and p given the prefix, and every draw
    is keyed by position, so greedy output does not depend on where blocks begin. The expert
    caches the prompt while the first block is drafted (`_Prefill`). With pipelining
    (`request.pipeline`), the drafter drafts the next block ahead while the expert verifies
    (`_Ahead`); without a block drafted ahead, a drafter that computes apart (a tier) gets the next
    block's draft before the round is yielded, so the caller's work on the round (streaming it)
    overlaps the drafter's (`_NextDraft`).
    The output is the same either way. `limit`: the most new tokens the request may produce (no
    block is drafted ahead past it)."""
    tokens = list(prompt)
    rule, alpha = request.rule, request.alpha
    payload = DraftPayload.for_request(rule, request.sampling, logprobs=request.logprobs)
    governor = PipelineGovernor(request.pipeline, overlaps=drafter.overlaps_expert)
    ahead: _Ahead | None = None
    next_draft: _NextDraft | None = None
    outcome: VerifyOutcome | None = None
    prefill: _Prefill | None = _Prefill(expert, tokens, request)
    gamma = request.block_size if resumed else min(FIRST_BLOCK_SIZE, request.block_size)
    try:
        while True:
            record = RoundRecord(skippable_rounds=int(not rule.needs_expert_to_decide), pipeline=governor.reason())
            block = await ahead.take(record, outcome, governor) if ahead is not None else None
            ahead = None
            if block is None and next_draft is not None:
                block = await next_draft.take(record, governor)
            next_draft = None
            if block is None:
                block = await _draft(drafter, tokens, gamma, request, payload, record, governor)
            gamma = request.block_size
            if rule is Rule.CHOW and block.gamma and _chow_keeps(block, alpha):
                # Confident everywhere: pi = q at every position, so every token is kept and the
                # expert is not needed. It catches up on these tokens in its next pass.
                _keep_drafted(record, block)
            else:
                # A block drafted ahead must fit the context window: only while a round after
                # this one still fits the request's tokens (generation_limit keeps a round's room).
                produced = len(tokens) - len(prompt)
                if block.gamma and produced + block.gamma + 1 + request.block_size < limit and governor.wants_predraft():
                    ahead = _Ahead(drafter, tokens, block, request, payload)
                if prefill is not None:
                    await prefill.wait(record)
                    prefill = None
                outcome = await _verify(expert, tokens, block, rule, alpha, request, record)
            governor.observe_round(ahead is not None)
            tokens += [t for t, _ in record.emitted]
            if ahead is None and drafter.computes_apart and len(tokens) - len(prompt) < limit:
                next_draft = _NextDraft(drafter, tokens, request, payload)
                await asyncio.sleep(0)  # its call goes out (its first step sends it) before the round is taken
            yield record
    finally:
        if ahead is not None:  # the request ended (or was cancelled) with a block drafted ahead
            ahead.task.cancel()
        if next_draft is not None:  # ... or with the next block's draft on its way
            next_draft.cancel()
        if prefill is not None:  # ... or before its first verify
            prefill.task.cancel()
            prefill.task.add_done_callback(lambda task: task.cancelled() or task.exception())


async def expert_steps(expert: ExpertRole, prompt: list[int], request: GenerationRequest) -> Rounds:
    """Plain decoding with the expert: an empty block per round, one token per forward pass."""
    tokens = list(prompt)
    while True:
        record = RoundRecord()
        await _verify(expert, tokens, EMPTY_BLOCK, Rule.LOSSLESS, 0.0, request, record)
        tokens += [t for t, _ in record.emitted]
        yield record


async def drafter_steps(drafter: DrafterRole, expert: ExpertRole, prompt: list[int], request: GenerationRequest) -> Rounds:
    """Plain decoding with the drafter, one token per forward pass."""
    tokens = list(prompt)
    payload = DraftPayload.for_request(Rule.CHOW, request.sampling, logprobs=request.logprobs)
    while True:
        record = RoundRecord(skippable_rounds=1)
        block = await _draft(drafter, tokens, 1, request, payload, record)
        if block.gamma:
            _keep_drafted(record, block)
        else:
            await _verify(expert, tokens, block, Rule.LOSSLESS, 0.0, request, record)
        tokens += [t for t, _ in record.emitted]
        yield record


async def token_cascade_steps(drafter: DrafterRole, expert: ExpertRole, prompt: list[int],
                              request: GenerationRequest) -> Rounds:
    """Per token: the drafter's token if it is confident, otherwise the expert's, computed
    sequentially (the expert catches up on every token since its last call)."""
    tokens = list(prompt)
    payload = DraftPayload.for_request(Rule.CHOW, request.sampling, logprobs=request.logprobs)
    while True:
        record = RoundRecord(skippable_rounds=1)
        block = await _draft(drafter, tokens, 1, request, payload, record)
        if block.gamma and not bool(token_cascade_defers(torch.from_numpy(block.max_q).unsqueeze(-1), request.alpha)):
            _keep_drafted(record, block)
        else:
            record.deferred += block.gamma
            await _verify(expert, tokens, EMPTY_BLOCK, Rule.LOSSLESS, 0.0, request, record)
        tokens += [t for t, _ in record.emitted]
        yield record


async def sequence_cascade_rounds(drafter: DrafterRole, expert: ExpertRole, prompt: list[int], request: GenerationRequest,
                                  answer_is_complete: Callable[[list[int]], bool]) -> Rounds:
    """The drafter answers in full; if its confidence is low the expert answers from scratch.

    `answer_is_complete(tokens)` applies the request's stop conditions to the drafter's answer.
    Drafting the answer is one round per token; its verdict (all kept, or all deferred) is one
    more round, which emits the answer when it is kept.
    """
    payload = DraftPayload.for_request(Rule.CHOW, request.sampling, token_probs=True, logprobs=request.logprobs)
    answer: list[int] = []
    token_q: list[torch.Tensor] = []
    answer_logprobs: list = []  # the drafter's log q of each answer token (a kept answer's output is q)
    while True:
        record = RoundRecord()
        block = await _draft(drafter, prompt + answer, 1, request, payload, record)
        if not block.gamma:  # no drafter: the expert answers
            break
        answer += block.tokens
        token_q.append(torch.from_numpy(block.token_q))
        if block.logprob_chosen is not None:
            answer_logprobs += TokenLogprobs.of_block(block).rows()
        complete = answer_is_complete(answer)
        if complete:
            if not sequence_cascade_defers(torch.log(torch.cat(token_q).clamp_min(1e-30)), request.alpha):
                record.accepted += len(answer)
                record.skipped_blocks += 1
                record.emitted += [(t, Source.DRAFTER) for t in answer]
                record.logprobs += answer_logprobs
                yield record
                return
            record.deferred += len(answer)
        yield record
        if complete:
            break
    async for record in expert_steps(expert, prompt, request):
        yield record


def rounds_for(request: GenerationRequest, drafter: DrafterRole, expert: ExpertRole, prompt: list[int],
               answer_is_complete: Callable[[list[int]], bool], limit: int, resumed: bool = False) -> Rounds:
    """The rounds of `request`'s method after `prompt`. `resumed`: `prompt` ends with output a
    stream already delivered (it was cut at a round boundary and continues): every method's next
    round depends only on the tokens before it, as its draws are keyed by position, except the
    sequence cascade's, which then is past its drafter's answer (a kept answer is the whole output,
    delivered at once in the stream's last chunk), in its expert's steps."""
    method = request.method
    if method is Method.SEQUENCE_CASCADE and resumed:
        return expert_steps(expert, prompt, request)
    if method is Method.EXPERT_ONLY:
        return expert_steps(expert, prompt, request)
    if method is Method.DRAFTER_ONLY:
        return drafter_steps(drafter, expert, prompt, request)
    if method is Method.TOKEN_CASCADE:
        return token_cascade_steps(drafter, expert, prompt, request)
    if method is Method.SEQUENCE_CASCADE:
        return sequence_cascade_rounds(drafter, expert, prompt, request, answer_is_complete)
    return speculative_rounds(drafter, expert, prompt, request, limit, resumed=resumed)


async def prompt_scoring_round(expert: ExpertRole, prompt: list[int], request: GenerationRequest
                               ) -> tuple[RoundRecord, TokenLogprobs]:
    """The expert's logprobs of the prompt's tokens 1..n-1 given their prefixes (with the top
    `request.prompt_logprobs`): one expert pass over the prompt, as a round that emits nothing.
    It is a verify of an empty block at the prompt's end, whose next token is dropped: its draw
    is keyed by (seed, position, verify) like every draw, so decoding after it is unchanged, and the
    expert's cache then holds the prompt."""
    record = RoundRecord()
    with _timed(record, "expert_seconds"):
        outcome, report = await expert.verify(list(prompt), len(prompt), EMPTY_BLOCK, Rule.LOSSLESS, 0.0,
                                              request.sampling, request.seed,
                                              prompt_logprobs=request.prompt_logprobs)
    _count_call(record, "expert", report)
    record.expert_passes += 1
    return record, outcome.prompt_logprobs
