"""The decoding loops: speculative cascades and the baselines they are measured against.

Each loop is a generator of rounds; a round is the list of (token, source) it emits. The caller
decides when to stop (EOS, length, stop strings) by closing the generator, so no loop does more
than one round of work past the end of the output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..cascade import Rule, SamplingParams, adjust_probs, sample, sequence_cascade_defers, verify_block
from ..cascade.baselines import token_cascade_defers
from ..cascade.rules import mixture_defers
from .request import GenerationRequest, Method
from .runner import KVSession, ModelRunner
from .stats import GenerationStats, Source

Round = list[tuple[int, Source]]


@dataclass
class Generators:
    """Independent random streams per request, so that e.g. chow at its never-defer alpha draws
    exactly the same drafter tokens as drafter-only decoding with the same seed."""

    draft: torch.Generator
    verify: torch.Generator

    @classmethod
    def from_seed(cls, seed: int) -> "Generators":
        return cls(torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed ^ 0x5DEECE66D))


@dataclass
class Participant:
    """A model and its KV session for one request."""

    runner: ModelRunner
    session: KVSession


@contextmanager
def _timed(stats: GenerationStats, field: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        setattr(stats, field, getattr(stats, field) + time.perf_counter() - start)


def draft_block(
    drafter: Participant, tokens: list[int], gamma: int, sampling: SamplingParams,
    generator: torch.Generator, stats: GenerationStats,
) -> tuple[list[int], torch.Tensor]:
    """Draft gamma tokens after `tokens`; returns them and q (temperature 1) at each, [gamma, V]."""
    drafted: list[int] = []
    rows = []
    with _timed(stats, "drafter_seconds"):
        for _ in range(gamma):
            q = drafter.runner.next_distribution(drafter.session, tokens + drafted)
            rows.append(q)
            drafted.append(int(sample(adjust_probs(q, sampling), generator, greedy=sampling.is_greedy)))
    stats.drafter_passes += gamma
    stats.drafted += gamma
    return drafted, torch.stack(rows)


def speculative_rounds(
    drafter: Participant, expert: Participant, prompt: list[int], request: GenerationRequest,
    stats: GenerationStats, generators: Generators,
) -> Iterator[Round]:
    """Draft gamma tokens, score them with one expert pass, keep what the rule accepts."""
    tokens = list(prompt)
    rule, alpha, gamma, sampling = request.rule, request.alpha, request.block_size, request.sampling
    while True:
        stats.rounds += 1
        drafted, q = draft_block(drafter, tokens, gamma, sampling, generators.draft, stats)
        if rule is Rule.CHOW:
            deferred = mixture_defers(Rule.CHOW, q, None, alpha)
            if not bool(deferred.any()):
                # Confident everywhere: pi = q at every position, so every token is kept and the
                # expert is not needed. It catches up on these tokens in its next pass.
                stats.skipped_blocks += 1
                stats.accepted += gamma
                tokens += drafted
                yield [(t, Source.DRAFTER) for t in drafted]
                continue
        with _timed(stats, "expert_seconds"):
            p = expert.runner.distributions(expert.session, tokens + drafted, start=len(tokens))
        stats.expert_passes += 1
        verdict = verify_block(rule, alpha, torch.tensor(drafted), q, p, sampling, generators.verify)
        stats.accepted += verdict.num_accepted
        stats.deferred += verdict.num_deferred
        if verdict.is_bonus:
            stats.bonus += 1
        else:
            stats.corrected += 1
        kept = drafted[: verdict.num_accepted]
        tokens += kept + [verdict.next_token]
        yield [(t, Source.DRAFTER) for t in kept] + [(verdict.next_token, Source.EXPERT)]


def autoregressive_steps(
    model: Participant, source: Source, prompt: list[int], sampling: SamplingParams,
    generator: torch.Generator, stats: GenerationStats,
) -> Iterator[Round]:
    """Plain decoding with one model, one token per forward pass."""
    tokens = list(prompt)
    seconds_field = "drafter_seconds" if source is Source.DRAFTER else "expert_seconds"
    passes_field = "drafter_passes" if source is Source.DRAFTER else "expert_passes"
    while True:
        stats.rounds += 1
        with _timed(stats, seconds_field):
            dist = model.runner.next_distribution(model.session, tokens)
        setattr(stats, passes_field, getattr(stats, passes_field) + 1)
        token = int(sample(adjust_probs(dist, sampling), generator, greedy=sampling.is_greedy))
        tokens.append(token)
        yield [(token, source)]


def token_cascade_steps(
    drafter: Participant, expert: Participant, prompt: list[int], request: GenerationRequest,
    stats: GenerationStats, generators: Generators,
) -> Iterator[Round]:
    """Per token: the drafter's token if it is confident, otherwise the expert's, computed
    sequentially (the expert catches up on every token since its last call)."""
    tokens = list(prompt)
    sampling = request.sampling
    while True:
        stats.rounds += 1
        with _timed(stats, "drafter_seconds"):
            q = drafter.runner.next_distribution(drafter.session, tokens)
        stats.drafter_passes += 1
        if bool(token_cascade_defers(q, request.alpha)):
            stats.deferred += 1
            with _timed(stats, "expert_seconds"):
                p = expert.runner.next_distribution(expert.session, tokens)
            stats.expert_passes += 1
            token = int(sample(adjust_probs(p, sampling), generators.verify, greedy=sampling.is_greedy))
            source = Source.EXPERT
        else:
            token = int(sample(adjust_probs(q, sampling), generators.draft, greedy=sampling.is_greedy))
            source = Source.DRAFTER
        tokens.append(token)
        yield [(token, source)]


def sequence_cascade_rounds(
    drafter: Participant, expert: Participant, prompt: list[int], request: GenerationRequest,
    stats: GenerationStats, generators: Generators, answer_is_complete: Callable[[list[int]], bool],
) -> Iterator[Round]:
    """The drafter answers in full; if its confidence is low the expert answers from scratch.

    `answer_is_complete(tokens)` applies the request's stop conditions to the drafter's answer.
    """
    tokens = list(prompt)
    sampling = request.sampling
    answer: list[int] = []
    logprobs: list[float] = []
    while True:
        stats.rounds += 1
        with _timed(stats, "drafter_seconds"):
            q = drafter.runner.next_distribution(drafter.session, tokens + answer)
        stats.drafter_passes += 1
        token = int(sample(adjust_probs(q, sampling), generators.draft, greedy=sampling.is_greedy))
        answer.append(token)
        logprobs.append(float(torch.log(q[token].clamp_min(1e-30))))
        if answer_is_complete(answer):
            break
    stats.drafted += len(answer)
    if not sequence_cascade_defers(torch.tensor(logprobs), request.alpha):
        stats.accepted += len(answer)
        yield [(t, Source.DRAFTER) for t in answer]
        return
    stats.deferred += len(answer)
    yield from autoregressive_steps(expert, Source.EXPERT, prompt, sampling, generators.verify, stats)


def rounds_for(
    request: GenerationRequest, drafter: Participant | None, expert: Participant | None,
    prompt: list[int], stats: GenerationStats, generators: Generators,
    answer_is_complete: Callable[[list[int]], bool],
) -> Iterator[Round]:
    method = request.method
    if method is Method.EXPERT_ONLY:
        return autoregressive_steps(expert, Source.EXPERT, prompt, request.sampling, generators.draft, stats)
    if method is Method.DRAFTER_ONLY:
        return autoregressive_steps(drafter, Source.DRAFTER, prompt, request.sampling, generators.draft, stats)
    if method is Method.TOKEN_CASCADE:
        return token_cascade_steps(drafter, expert, prompt, request, stats, generators)
    if method is Method.SEQUENCE_CASCADE:
        return sequence_cascade_rounds(drafter, expert, prompt, request, stats, generators, answer_is_complete)
    return speculative_rounds(drafter, expert, prompt, request, stats, generators)
