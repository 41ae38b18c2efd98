"""The compact draft payload decides and verifies exactly like the full distributions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from speccascade.cascade import Rule, SamplingParams, adjust_probs, sample, verify_block
from speccascade.engine.blocks import (
    EMPTY_BLOCK,
    DraftPayload,
    SampleRows,
    block_from_host,
    densify,
    drafted_q,
    full_rows,
    summarize_draft,
)
from speccascade.engine.seeding import Purpose, draw_generator, draw_seed

VOCAB, GAMMA = 50, 4


def peaked(seed: int, rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, VOCAB, generator=gen) * 3.0, dim=-1)


def ship(tokens: list[int], q: torch.Tensor, q_sample: torch.Tensor | None, payload: DraftPayload):
    """The block a drafter ships for these tokens: summarized on the device, brought to the host."""
    arrays = summarize_draft(q, q_sample, torch.tensor(tokens), payload)
    return block_from_host({name: t.cpu() for name, t in arrays.items()})


def draft(q: torch.Tensor, sampling: SamplingParams, seed: int) -> tuple[list[int], torch.Tensor]:
    q_sample = adjust_probs(q, sampling)
    gen = draw_generator(seed, 0, Purpose.DRAFT)
    return [int(sample(row, gen, greedy=sampling.is_greedy)) for row in q_sample], q_sample


@pytest.mark.parametrize("sampling,rows", [
    (SamplingParams(), SampleRows.NONE),
    (SamplingParams(temperature=0.8, top_k=5), SampleRows.SPARSE),
    (SamplingParams(temperature=1.0, top_p=0.8), SampleRows.SPARSE),
    (SamplingParams(temperature=0.7), SampleRows.FULL),
])
@pytest.mark.parametrize("rule,alpha", [("lossless", 0.0), ("chow", 0.4), ("diff", 0.1), ("opt", 0.5),
                                        ("token", 0.3), ("token_v1", 0.1), ("token_v2", 0.2), ("lossy", 0.3)])
def test_verdict_from_the_payload_equals_the_verdict_from_full_q(sampling, rows, rule, alpha):
    payload = DraftPayload.for_request(Rule(rule), sampling)
    assert payload.sample_rows is rows
    assert payload.full_decision_rows == (rule == "opt" or (rule == "token_v1" and not sampling.is_greedy))
    for trial in range(20):
        q, p = peaked(trial, GAMMA), peaked(1000 + trial, GAMMA + 1)
        tokens, q_sample = draft(q, sampling, seed=trial)
        block = ship(tokens, q, None if sampling.is_greedy else q_sample, payload)
        q_wire, q_sample_wire = densify(block, VOCAB, "cpu")
        generator = lambda: draw_generator(trial, 0, Purpose.VERIFY)  # noqa: E731
        expected = verify_block(rule, alpha, torch.tensor(tokens), q, p, sampling, generator())
        got = verify_block(rule, alpha, torch.tensor(tokens), q_wire, p, sampling, generator(),
                           q_sample=q_sample_wire)
        assert (got.num_accepted, got.next_token, got.is_bonus) == (
            expected.num_accepted, expected.next_token, expected.is_bonus), trial
        assert torch.equal(got.deferred, expected.deferred)


@pytest.mark.parametrize("rule", [Rule.CHOW, Rule.OPT])
def test_drafted_q_is_what_densify_rebuilds_at_the_drafted_tokens(rule):
    """Greedy verification reads max q and q at each drafted token without rebuilding the rows:
    the same numbers densify's rows hold, also where a near-uniform q's max lies below the mass
    densify spreads over the other tokens."""
    flat = torch.full((GAMMA, VOCAB), 1.0 / VOCAB)
    flat[0, 3] = 0.001
    for q in (peaked(5, GAMMA), flat / flat.sum(dim=-1, keepdim=True)):
        tokens, _ = draft(q, SamplingParams(), seed=0)
        block = ship(tokens, q, None, DraftPayload.for_request(rule, SamplingParams()))
        if rule is Rule.CHOW:  # the shipped max of a row whose drafted token holds too little
            block = replace(block, max_q=np.where(np.arange(GAMMA) == 0, np.float32(0.001), block.max_q))
        rebuilt, _ = densify(block, VOCAB, "cpu")
        max_q, at_drafted = drafted_q(block, VOCAB, "cpu")
        assert torch.equal(max_q, rebuilt.amax(dim=-1))
        assert torch.equal(at_drafted, rebuilt.gather(-1, torch.tensor(tokens).view(-1, 1)).squeeze(-1))


def test_greedy_payload_is_tokens_and_max_q_only():
    q = peaked(0, GAMMA)
    tokens, q_sample = draft(q, SamplingParams(), seed=0)
    block = ship(tokens, q, None, DraftPayload.for_request(Rule.TOKEN, SamplingParams()))
    assert block.nbytes() == GAMMA * (4 + 4)


def test_sequence_cascade_payload_adds_q_at_each_drafted_token():
    q = peaked(1, GAMMA)
    tokens, _ = draft(q, SamplingParams(), seed=0)
    block = ship(tokens, q, None, DraftPayload.for_request(Rule.CHOW, SamplingParams(), token_probs=True))
    torch.testing.assert_close(torch.from_numpy(block.token_q), q[torch.arange(GAMMA), torch.tensor(tokens)])
    assert block.nbytes() == GAMMA * (4 + 4 + 4)


def test_sparse_rows_travel_as_int32_indices():
    q = peaked(2, GAMMA)
    sampling = SamplingParams(temperature=0.8, top_k=5)
    tokens, q_sample = draft(q, sampling, seed=0)
    block = ship(tokens, q, q_sample, DraftPayload.for_request(Rule.TOKEN, sampling))
    assert block.sample_indices.dtype == np.int32 and block.sample_indices.shape == (GAMMA, 5)
    assert isinstance(block.sample_values, np.ndarray)  # arrays on the wire, not torch tensors
    assert block.nbytes() == GAMMA * (4 + 4) + GAMMA * 5 * (4 + 4)


def sharp(seed: int, rows: int, vocab: int = 2000) -> torch.Tensor:
    """Rows like a trained model's: most probabilities below float16's smallest (~6e-8)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, vocab, generator=gen) * 6.0, dim=-1)


@pytest.mark.parametrize("rule,sampling", [("lossless", SamplingParams(temperature=1.0)),
                                           ("opt", SamplingParams(temperature=0.7, top_k=20))])
def test_rows_with_few_nonzero_float16_values_travel_as_those_values_and_rebuild_exactly(rule, sampling):
    q = sharp(0, GAMMA)
    q[1] = torch.softmax(torch.randn(2000, generator=torch.Generator().manual_seed(9)) * 9.0, dim=-1)  # fewer
    tokens, q_sample = draft(q, sampling, seed=0)
    payload = DraftPayload.for_request(Rule(rule), sampling)
    block = ship(tokens, q, q_sample, payload)
    name = "sample_full" if rule == "lossless" else "decision_full"
    rows = q_sample if rule == "lossless" else q
    values, ids = getattr(block, name), getattr(block, f"{name}_ids")
    counts = (rows.half() != 0).sum(dim=-1)
    assert ids.dtype == np.int32 and values.dtype == np.float16
    assert values.shape == ids.shape == (GAMMA, int(counts.max())) and counts.min() < counts.max()
    assert values.nbytes + ids.nbytes == GAMMA * int(counts.max()) * 6 < GAMMA * 2000 * 2  # dense: 2 bytes an id
    # The dense float16 rows exactly, so the verdicts are the dense payload's.
    q_wire, q_sample_wire = densify(block, 2000, "cpu")
    exact = q_sample.half().float() if rule == "lossless" else q.half().float()
    rebuilt = q_sample_wire if rule == "lossless" else q_wire
    assert torch.equal(rebuilt, exact / exact.sum(dim=-1, keepdim=True))
    dense = replace(block, **{name: rows.half().numpy(), f"{name}_ids": None})
    p = sharp(100, GAMMA + 1)
    for trial in range(10):
        verdicts = [verify_block(rule, 0.5, torch.tensor(tokens), *densify(b, 2000, "cpu")[:1], p, sampling,
                                 draw_generator(trial, 0, Purpose.VERIFY), q_sample=densify(b, 2000, "cpu")[1])
                    for b in (block, dense)]
        assert (verdicts[0].num_accepted, verdicts[0].next_token) == (verdicts[1].num_accepted, verdicts[1].next_token)
    # A block's first tokens keep their rows' values at their ids.
    head = block.prefix(2)
    torch.testing.assert_close(densify(head, 2000, "cpu")[1 if rule == "lossless" else 0], rebuilt[:2], rtol=0, atol=0)


def test_near_uniform_rows_stay_dense():
    """A random model's rows are non-zero everywhere in float16: ids would only add bytes."""
    rows = torch.softmax(torch.randn(GAMMA, VOCAB) * 0.1, dim=-1)
    shipped = full_rows(rows, "sample_full")
    assert set(shipped) == {"sample_full"} and shipped["sample_full"].shape == (GAMMA, VOCAB)
    # At the break-even a row's non-zeros cost as much as the row: dense still.
    edge = torch.zeros(GAMMA, 30)
    edge[:, :10] = 0.1
    assert set(full_rows(edge, "sample_full")) == {"sample_full"}
    edge[0, 9] = 0.0
    edge[:, 8] = 0.0
    assert set(full_rows(edge, "sample_full")) == {"sample_full", "sample_full_ids"}


def test_an_empty_sampled_draft_ships_empty_rows():
    empty = torch.zeros(0, VOCAB)
    sampling = SamplingParams(temperature=0.9)
    block = ship([], empty, empty, DraftPayload.for_request(Rule.TOKEN, sampling))
    assert block.gamma == 0 and block.sample_full.shape == (0, VOCAB) and block.sample_full_ids is None


def test_an_empty_block_verifies_to_the_experts_own_token():
    """Expert-only decoding sends no draft: the answer is the expert's next token."""
    p = peaked(3, 1)
    q, q_sample = densify(EMPTY_BLOCK, VOCAB, "cpu")
    verdict = verify_block("lossless", 0.0, torch.zeros(0, dtype=torch.long), q, p, SamplingParams(),
                           q_sample=q_sample)
    assert (verdict.num_accepted, verdict.next_token, verdict.is_bonus) == (0, int(p[0].argmax()), True)


def test_draw_seeds_are_deterministic_and_independent():
    assert draw_seed(7, 3, Purpose.DRAFT) == draw_seed(7, 3, Purpose.DRAFT)
    seeds = {draw_seed(7, position, purpose) for position in range(100) for purpose in Purpose}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert draw_seed(8, 3, Purpose.DRAFT) != draw_seed(7, 3, Purpose.DRAFT)
