"""The compact draft payload decides and verifies exactly like the full distributions."""

from __future__ import annotations

import pytest
import torch

from speccascade.cascade import Rule, SamplingParams, adjust_probs, sample, verify_block
from speccascade.tiers.wire import (
    DraftPayload, Role, SampleRows, densify, generator_for, round_seed, summarize_draft,
)

VOCAB, GAMMA = 50, 4


def peaked(seed: int, rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, VOCAB, generator=gen) * 3.0, dim=-1)


def draft(q: torch.Tensor, sampling: SamplingParams, seed: int) -> tuple[list[int], torch.Tensor]:
    q_sample = adjust_probs(q, sampling)
    gen = generator_for(seed)
    return [int(sample(row, gen, greedy=sampling.is_greedy)) for row in q_sample], q_sample


@pytest.mark.parametrize("sampling,rows", [
    (SamplingParams(), SampleRows.NONE),
    (SamplingParams(temperature=0.8, top_k=5), SampleRows.SPARSE),
    (SamplingParams(temperature=1.0, top_p=0.8), SampleRows.SPARSE),
    (SamplingParams(temperature=0.7), SampleRows.FULL),
])
@pytest.mark.parametrize("rule,alpha", [("lossless", 0.0), ("chow", 0.4), ("diff", 0.1), ("opt", 0.5),
                                        ("token", 0.3), ("lossy", 0.3)])
def test_verdict_from_the_payload_equals_the_verdict_from_full_q(sampling, rows, rule, alpha):
    payload = DraftPayload.for_request(Rule(rule), sampling)
    assert payload.sample_rows is rows and payload.full_decision_rows == (rule == "opt")
    for trial in range(20):
        q, p = peaked(trial, GAMMA), peaked(1000 + trial, GAMMA + 1)
        tokens, q_sample = draft(q, sampling, seed=trial)
        block = summarize_draft(tokens, q, q_sample, payload)
        q_wire, q_sample_wire = densify(block, VOCAB)
        expected = verify_block(rule, alpha, torch.tensor(tokens), q, p, sampling, generator_for(trial))
        got = verify_block(rule, alpha, torch.tensor(tokens), q_wire, p, sampling, generator_for(trial),
                           q_sample=q_sample_wire)
        assert (got.num_accepted, got.next_token, got.is_bonus) == (
            expected.num_accepted, expected.next_token, expected.is_bonus), trial
        assert torch.equal(got.deferred, expected.deferred)


def test_greedy_payload_is_tokens_and_max_q_only():
    q = peaked(0, GAMMA)
    tokens, q_sample = draft(q, SamplingParams(), seed=0)
    block = summarize_draft(tokens, q, q_sample, DraftPayload.for_request(Rule.TOKEN, SamplingParams()))
    assert block.nbytes() == GAMMA * (4 + 4)


def test_an_empty_block_verifies_to_the_experts_own_token():
    """Expert-only decoding sends no draft: the answer is the expert's next token."""
    p = peaked(3, 1)
    block = summarize_draft([], torch.zeros(0, VOCAB), torch.zeros(0, VOCAB),
                            DraftPayload.for_request(Rule.LOSSLESS, SamplingParams()))
    q, q_sample = densify(block, VOCAB)
    verdict = verify_block("lossless", 0.0, torch.zeros(0, dtype=torch.long), q, p, SamplingParams(),
                           q_sample=q_sample)
    assert (verdict.num_accepted, verdict.next_token, verdict.is_bonus) == (0, int(p[0].argmax()), True)


def test_round_seeds_are_deterministic_and_independent():
    assert round_seed(7, 3, Role.DRAFT) == round_seed(7, 3, Role.DRAFT)
    seeds = {round_seed(7, r, role) for r in range(100) for role in Role}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
