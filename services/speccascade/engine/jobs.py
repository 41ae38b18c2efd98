"""The drafter's and the expert's work on a model backend, for a batch of sessions at once: the
bodies of a draft call and a verify call. The in-process roles run them on batches of one; a
tier runs every queued call of its forward pass as one batch. Either way each session's result is
what it would be alone: draws are keyed by (request seed, position, purpose), and the math
decides row by row.

Drafting a block of gamma tokens is gamma model steps over the whole batch: the first scores each
session's context (the backend reuses its cache, so usually one new token), the others feed the
tokens just chosen, which stay on the device (`ModelBackend.step`): tokens are chosen there
(argmax, or a draw from each session's own generator) and the host reads the block once, at the
end. Verification scores every block in one pass and decides every block in one set of tensor
operations per (rule, gamma, sampling) group (`cascade.verify_blocks`); the outcomes leave the
device together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ..cascade import GreedyEvidence, adjust_probs, sample, verify_blocks, verify_greedy_blocks
from ..cascade.logprobs import output_distributions
from ..options import Rule, SamplingParams
from .backends import BackendSession, ModelBackend, ScoreJob
from .blocks import (
    DraftedBlock,
    DraftPayload,
    TokenLogprobs,
    VerifyOutcome,
    block_from_host,
    densify,
    drafted_q,
    logprobs_on_device,
    summarize_draft,
)
from .seeding import Purpose, draw_generator


@dataclass(frozen=True)
class DraftJob:
    session: BackendSession
    context: Sequence[int]  # the whole sequence the block follows
    gamma: int
    sampling: SamplingParams
    seed: int
    payload: DraftPayload


@dataclass(frozen=True)
class VerifyJob:
    session: BackendSession
    sequence: Sequence[int]  # context + the drafted block, which starts at `start`
    start: int
    block: DraftedBlock
    rule: Rule
    alpha: float
    sampling: SamplingParams
    seed: int
    logprobs: int | None = None  # the emitted tokens' logprobs, with the top k (k = this), if asked for
    prompt_logprobs: int | None = None  # also those of sequence[1:start] under the expert, top k

    @property
    def score_from(self) -> int:
        """Where the pass starts scoring: at the block, or at the sequence's second token when the
        prompt's own logprobs are wanted (then every row of the prompt is computed in the pass)."""
        return self.start if self.prompt_logprobs is None else 1


# A call with more uncached context tokens than this is prefilled apart before it joins the
# batches (the tiers in chunks, batched evaluation alone): a verify after a normal round has 1
# (the round's last token), after a chow skip gamma + 1.
PREFILL_THRESHOLD = 16


def scoring_job(job: DraftJob | VerifyJob) -> ScoreJob:
    """The pass a job's call starts with: a draft scores its context for the first token, a verify
    its sequence from `score_from`."""
    if isinstance(job, DraftJob):
        return ScoreJob(job.session, job.context, len(job.context))
    return ScoreJob(job.session, job.sequence, job.score_from)


def context_to_cache(job: DraftJob | VerifyJob) -> Sequence[int]:
    """The tokens that must be cached before the call's own step (a verify that wants its
    prompt's logprobs scores every prompt row in its pass, so nothing is prefilled apart)."""
    return job.context if isinstance(job, DraftJob) else job.sequence[: job.score_from]


@dataclass
class WorkTimes:
    """Seconds a batch spent in model passes, and in choosing tokens (drafting) or deciding blocks
    (verification), the transfer to the host included. On a GPU these are device times between
    events, read after the batch's one host sync."""

    forward_s: float = 0.0
    decide_s: float = 0.0


class _Stopwatch:
    """Marks between phases: CUDA events on a GPU (no sync to take them), the clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = [self._mark()]

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def lap(self) -> None:
        self.marks.append(self._mark())

    def laps(self) -> list[float]:
        """Seconds between consecutive marks (after the host has waited for the device)."""
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def with_suppression(probs: Tensor, samplings: Sequence[SamplingParams], positions: Sequence[int]) -> Tensor:
    """`probs` ([rows, V], row r the distribution of the token at `positions[r]`) with each row's
    suppressed ids (`SamplingParams.suppressed_ids`) zeroed where its sampling suppresses them, and
    the row renormalised: the drafter's q and the expert's p are masked alike, so the rules decide
    over the masked distributions. A row with no mass left outside the suppressed ids (every other
    probability underflowed) becomes uniform over the allowed ids rather than NaN. Rows that
    suppress nothing are left as they are (and `probs` itself when no row does)."""
    masked_rows = [(row, sampling) for row, (sampling, position) in enumerate(zip(samplings, positions))
                   if sampling.suppresses_at(position)]
    if not masked_rows:
        return probs
    out = probs.clone()
    vocab = probs.shape[-1]
    for row, sampling in masked_rows:
        ids = torch.tensor(sorted(i for i in sampling.suppressed_ids if i < vocab), dtype=torch.long,
                           device=probs.device)
        allowed = torch.ones(vocab, dtype=probs.dtype, device=probs.device).index_fill_(0, ids, 0)
        kept = out[row] * allowed
        mass = kept.sum()
        out[row] = torch.where(mass > 0, kept / mass, allowed / allowed.sum())
    return out


def _choose(q: Tensor, jobs: Sequence[DraftJob], positions: Sequence[int]) -> tuple[Tensor, list[Tensor | None]]:
    """The next token of each row of q ([B, V], temperature 1), on the device, and each sampled
    row's sampling distribution. Greedy rows take the argmax; a sampled row draws with the key
    (seed, position, draft)."""
    tokens = q.argmax(dim=-1)
    sampled_rows: list[Tensor | None] = [None] * len(jobs)
    for row, (job, position) in enumerate(zip(jobs, positions)):
        if job.sampling.is_greedy:
            continue
        q_sample = adjust_probs(q[row], job.sampling)
        generator = draw_generator(job.seed, position, Purpose.DRAFT, q.device)
        tokens[row] = sample(q_sample, generator, greedy=False)
        sampled_rows[row] = q_sample
    return tokens, sampled_rows


def draft_blocks(backend: ModelBackend, jobs: Sequence[DraftJob], *,
                 ended: Callable[[int], bool] = lambda index: False) -> tuple[list[DraftedBlock | None], WorkTimes]:
    """Draft every job's block together; a job whose `ended(index)` turns true between steps stops
    there and gets None (its session was released: nobody reads its block)."""
    stopwatch = _Stopwatch(backend.device)
    times = WorkTimes()
    rows = [row[0] for row in backend.score([scoring_job(job) for job in jobs])]
    q = torch.stack(rows)  # [B, V]
    stopwatch.lap()
    drafted: list[list[tuple[Tensor, Tensor, Tensor | None]]] = [[] for _ in jobs]  # (token, q row, q_sample row)
    active = [i for i, job in enumerate(jobs) if job.gamma > 0 and not ended(i)]
    if len(active) < len(jobs):  # q's rows follow `active` from here on, as every later step's do
        q = q[torch.tensor(active, dtype=torch.long, device=q.device)]
    for step in range(max((job.gamma for job in jobs), default=0)):
        if not active:
            break
        rows_of = {index: row for row, index in enumerate(active)}
        positions = [len(jobs[i].context) + step for i in active]
        q = with_suppression(q, [jobs[i].sampling for i in active], positions)
        tokens, sampled = _choose(q, [jobs[i] for i in active], positions)
        for index in active:
            row = rows_of[index]
            drafted[index].append((tokens[row], q[row], sampled[row]))
        stopwatch.lap()
        still = [i for i in active if step + 1 < jobs[i].gamma and not ended(i)]
        if still:
            q = backend.step([jobs[i].session for i in still], tokens[[rows_of[i] for i in still]])
        active = still
        stopwatch.lap()
    # Every block's arrays, then one trip to the host for the whole batch.
    shipped: list[dict[str, Tensor] | None] = []
    for index, job in enumerate(jobs):
        steps = drafted[index]
        if ended(index) or len(steps) < job.gamma:
            shipped.append(None)
            continue
        if not steps:
            empty = torch.zeros(0, backend.vocab_size, device=backend.device)
            shipped.append(summarize_draft(empty, None if job.sampling.is_greedy else empty,
                                           torch.zeros(0, dtype=torch.long, device=backend.device), job.payload))
            continue
        q_rows = torch.stack([q_row for _, q_row, _ in steps])
        q_sample = None if job.sampling.is_greedy else torch.stack([s for _, _, s in steps])
        shipped.append(summarize_draft(q_rows, q_sample, torch.stack([t for t, _, _ in steps]), job.payload))
    on_host = [None if arrays is None else {name: t.cpu() for name, t in arrays.items()} for arrays in shipped]
    stopwatch.lap()
    blocks: list[DraftedBlock | None] = []
    for job, arrays in zip(jobs, on_host):
        block = None if arrays is None else block_from_host(arrays)
        if block is not None and block.gamma > 1:
            backend.settle(job.session, block.tokens[:-1])  # the last drafted token was never fed
        blocks.append(block)
    laps = stopwatch.laps()
    times.forward_s = laps[0] + sum(laps[2:-1:2])
    times.decide_s = sum(laps[1:-1:2]) + laps[-1]
    return blocks, times


def verify_blocks_on(backend: ModelBackend, jobs: Sequence[VerifyJob]) -> tuple[list[VerifyOutcome], WorkTimes]:
    """Score every job's sequence in one pass and verify every block, grouped by (rule, gamma,
    sampling) into `cascade.verify_blocks` calls; the outcomes reach the host together."""
    stopwatch = _Stopwatch(backend.device)
    scored = backend.score([scoring_job(job) for job in jobs])
    # A job that wants its prompt's logprobs was scored from position 1: its first start - 1 rows
    # are the expert's distributions of the prompt's tokens 1..start-1 given what precedes them
    # (as scored, with no min_tokens mask: that mask is about output positions).
    prompt_logprobs = [None if job.prompt_logprobs is None else _prompt_logprobs(job, rows[: job.start - 1])
                       for job, rows in zip(jobs, scored)]
    p_rows = [rows[job.start - job.score_from:] for job, rows in zip(jobs, scored)]  # [gamma + 1, V] each
    # Row j of a job's p is the expert's distribution at position start + j: masked as the
    # drafter masked its q there.
    p_rows = [with_suppression(rows, [job.sampling] * rows.shape[0], range(job.start, job.start + rows.shape[0]))
              for job, rows in zip(jobs, p_rows)]
    stopwatch.lap()
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault((job.rule, job.block.gamma, job.sampling), []).append(index)
    device = backend.device
    order: list[int] = []
    verdicts: list[Tensor] = []
    logprob_groups: list[tuple[list[int], dict[str, Tensor]]] = []
    for (rule, gamma, sampling), indices in groups.items():
        members = [jobs[i] for i in indices]
        drafted = torch.tensor([job.block.tokens for job in members], dtype=torch.long, device=device).view(
            len(members), gamma)
        alphas = [job.alpha for job in members]
        p = None
        if sampling.is_greedy and rule is not Rule.OPT:
            # A few numbers per position decide a greedy block (`verify_greedy_blocks`): no [G, gamma, V]
            # tables, none of the drafter's rows rebuilt, the expert's rows not even stacked.
            verdict = verify_greedy_blocks(rule, alphas, drafted,
                                           _greedy_evidence(members, [p_rows[i] for i in indices], drafted, backend))
        else:
            dense = [densify(job.block, backend.vocab_size, device) for job in members]
            p = torch.stack([p_rows[i] for i in indices])
            verdict = verify_blocks(
                rule, alphas, drafted, torch.stack([q for q, _ in dense]), p, sampling,
                None if sampling.is_greedy else [draw_generator(job.seed, job.start, Purpose.VERIFY, device)
                                                 for job in members],
                q_sample=torch.stack([q_sample for _, q_sample in dense]),
                # The bonus at start + gamma takes the uniform the drafter's token there takes:
                # a pre-draft's guess at it hits whenever p and q draw alike (`verify_blocks`).
                bonus_generators=None if sampling.is_greedy else [
                    draw_generator(job.seed, job.start + gamma, Purpose.DRAFT, device) for job in members],
            )
        order += indices
        verdicts.append(torch.stack([verdict.num_accepted, verdict.next_token, verdict.is_bonus.long(),
                                     verdict.deferred.sum(dim=-1)], dim=-1))
        # Only the blocks whose requests ask for logprobs (only theirs carry the drafter's numbers).
        wanting = [g for g, job in enumerate(members) if job.logprobs is not None]
        if wanting:
            picked = torch.tensor(wanting, dtype=torch.long, device=device)
            if p is None:
                p = torch.stack([p_rows[i] for i in indices])
            logprob_groups.append(([indices[g] for g in wanting], _emitted_logprobs(
                rule, [members[g] for g in wanting], drafted[picked], p[picked], verdict.num_accepted[picked],
                verdict.next_token[picked], verdict.deferred[picked], device)))
    rows = torch.cat(verdicts).tolist()  # the one trip to the host
    logprob_rows = [(indices, {name: t.cpu().numpy() for name, t in arrays.items()})
                    for indices, arrays in logprob_groups]  # only for requests that ask for logprobs
    stopwatch.lap()
    outcomes: list[VerifyOutcome | None] = [None] * len(jobs)
    for index, (accepted, token, bonus, deferred) in zip(order, rows):
        outcomes[index] = VerifyOutcome(accepted, token, bool(bonus), deferred,
                                        prompt_logprobs=prompt_logprobs[index])
    for indices, arrays in logprob_rows:
        for row, index in enumerate(indices):
            job, outcome = jobs[index], outcomes[index]
            if job.logprobs is not None:
                outcomes[index] = replace(outcome, logprobs=_merged_logprobs(job, outcome, arrays, row))
    forward_s, decide_s = stopwatch.laps()
    return outcomes, WorkTimes(forward_s, decide_s)  # type: ignore[return-value]


def _greedy_evidence(members: Sequence[VerifyJob], p_rows: Sequence[Tensor], drafted: Tensor,
                     backend: ModelBackend) -> GreedyEvidence:
    """`GreedyEvidence` of a group's blocks from each block's shipped numbers and each job's expert
    rows ([gamma + 1, V]), reduced row by row (the rows are never stacked)."""
    q_parts = [drafted_q(job.block, backend.vocab_size, backend.device) for job in members]
    p_parts = [GreedyEvidence.of_expert(tokens, rows) for rows, tokens in zip(p_rows, drafted)]
    max_q, q_drafted = (torch.stack(column) for column in zip(*q_parts))
    max_p, argmax_p, p_drafted = (torch.stack(column) for column in zip(*p_parts))
    return GreedyEvidence(max_q, q_drafted, max_p, argmax_p, p_drafted)


def _prompt_logprobs(job: VerifyJob, rows: Tensor) -> TokenLogprobs:
    """The expert's logprobs of the prompt's tokens 1..start-1 (rows [start - 1, V]), with the top
    k; the first token has none (nothing precedes it)."""
    tokens = torch.tensor(list(job.sequence[1: job.start]), dtype=torch.long, device=rows.device)
    arrays = logprobs_on_device(torch.log(rows.float()), tokens, job.prompt_logprobs)
    return TokenLogprobs(**{name: t.cpu().numpy() for name, t in arrays.items()})


def _emitted_logprobs(rule: Rule, members: Sequence[VerifyJob], drafted: Tensor, p: Tensor, num_accepted: Tensor,
                      next_token: Tensor, deferred: Tensor, device) -> dict[str, Tensor]:
    """On the device, for G verified blocks of one group: log pi of the token every position j in
    0..gamma would emit (the drafted token before the first rejection, the corrected or bonus token
    at it; later positions are never read) and pi's top k (the largest k asked for), plus the
    decisions, [G, gamma], for `_merged_logprobs`. pi is `cascade.logprobs.output_distributions`."""
    gamma, k = drafted.shape[1], max(job.logprobs for job in members)
    alpha = torch.tensor([job.alpha for job in members], dtype=torch.float64)
    exact_q = None
    if gamma and all(job.block.exact_rows is not None for job in members):
        exact_q = torch.stack([torch.from_numpy(job.block.exact_rows).to(device) for job in members])
    pi = output_distributions(rule, alpha, exact_q, p)  # [G, gamma + 1, V]
    emitted = torch.cat([drafted, next_token.view(-1, 1)], dim=1)
    emitted[torch.arange(len(members), device=device), num_accepted] = next_token
    arrays = logprobs_on_device(torch.log(pi), emitted, k)
    arrays["deferred"] = deferred
    return arrays


def _merged_logprobs(job: VerifyJob, outcome: VerifyOutcome, arrays: dict[str, np.ndarray], row: int) -> TokenLogprobs:
    """The logprobs of the outcome's num_accepted + 1 emitted tokens from the group's arrays (top k
    cut to the job's k). For chow, diff and opt a position that did not defer has pi = q: there the
    drafter's log q (shipped with the block) replaces the expert-side row, which is p. Such a
    position's token is always the drafted one (pi = q accepts it with probability 1), so the
    block's number is that of the emitted token."""
    count, k = outcome.num_accepted + 1, job.logprobs
    chosen = arrays["chosen"][row, :count].copy()
    ids = arrays["top_ids"][row, :count, :k].copy()
    values = arrays["top_values"][row, :count, :k].copy()
    if job.rule.is_token_specific or job.rule in (Rule.LOSSY, Rule.LOSSLESS) or not job.block.gamma:
        return TokenLogprobs(chosen, ids, values)
    drafter = TokenLogprobs.of_block(job.block)
    within = min(count, job.block.gamma)
    from_q = ~arrays["deferred"][row, :within].astype(bool)
    chosen[:within][from_q] = drafter.chosen[:within][from_q]
    ids[:within][from_q] = drafter.top_ids[:within, :k][from_q]
    values[:within][from_q] = drafter.top_values[:within, :k][from_q]
    return TokenLogprobs(chosen, ids, values)
