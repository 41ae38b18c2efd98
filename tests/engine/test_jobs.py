"""A tier's batch of drafts or verifies gives every session what it gets alone: what makes a
served request decode exactly like an in-process one, whoever shares its forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speccascade.cascade import GREEDY, verify_block
from speccascade.engine.backends import BACKEND_KINDS, ScoreJob, backend_class
from speccascade.engine.blocks import DraftPayload, densify
from speccascade.engine.jobs import DraftJob, VerifyJob, draft_blocks, verify_blocks_on
from speccascade.options import Rule, SamplingParams

from ..conftest import perturbed_copy, tiny_qwen2

VOCAB = 400
SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.9), SamplingParams(temperature=0.7, top_p=0.9)]


def contexts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in (7, 12, 3, 20)]


def assert_same_block(got, expected):
    """Same tokens; the same arrays up to float rounding (a batched pass sums in another order)."""
    assert got.tokens == expected.tokens
    for name in ("max_q", "sample_full", "sample_values"):
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-3, atol=1e-5)
    if expected.sample_indices is not None:
        assert got.sample_indices.tolist() == expected.sample_indices.tolist()


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_a_batch_of_drafts_equals_each_draft_alone(kind):
    backend = backend_class(kind)(tiny_qwen2(VOCAB, seed=2), name=kind)
    specs = [(context, gamma, SAMPLINGS[i % 3], 100 + i)
             for i, (context, gamma) in enumerate(zip(contexts(), (4, 2, 5, 1)))]

    def job(spec, session):
        context, gamma, sampling, seed = spec
        return DraftJob(session, context, gamma, sampling, seed, DraftPayload.for_request(Rule.TOKEN, sampling))

    alone = [draft_blocks(backend, [job(spec, backend.new_session())])[0][0] for spec in specs]
    sessions = [backend.new_session() for _ in specs]
    together, times = draft_blocks(backend, [job(spec, session) for spec, session in zip(specs, sessions)])
    for got, expected in zip(together, alone):
        assert_same_block(got, expected)
    assert [b.gamma for b in together] == [4, 2, 5, 1]
    # Each session cached its context and every drafted token it fed (all but the last), settled.
    for session, (context, _, _, _), block in zip(sessions, specs, together):
        assert session.tokens == list(context) + list(block.tokens[:-1])
    assert times.forward_s > 0


def test_a_draft_whose_session_ended_stops_and_gets_nothing():
    backend = backend_class("hf")(tiny_qwen2(VOCAB, seed=2), name="hf")
    jobs = [DraftJob(backend.new_session(), c, 5, SamplingParams(), 0, DraftPayload.for_request(Rule.TOKEN,
                                                                                             SamplingParams()))
            for c in contexts()[:2]]
    calls = backend.forward_calls
    blocks, _ = draft_blocks(backend, jobs, ended=lambda index: index == 1 and backend.forward_calls > calls + 1)
    assert blocks[0].gamma == 5 and blocks[1] is None


@pytest.mark.parametrize("first", ["ended before its first step", "gamma 0"])
def test_drafts_behind_a_job_that_drafts_nothing_use_their_own_distributions(first):
    """The batch's first pass scores every job; a job that takes no draft step (its caller left
    before the pass ended, or it asks for no token) must not shift the others onto its row."""
    backend = backend_class("hf")(tiny_qwen2(VOCAB, seed=2), name="hf")
    payload = DraftPayload.for_request(Rule.TOKEN, SamplingParams())
    first_context, *rest = contexts()[:3]
    alone = [draft_blocks(backend, [DraftJob(backend.new_session(), c, 3, SamplingParams(), 0, payload)])[0][0]
             for c in rest]
    head = DraftJob(backend.new_session(), first_context, 0 if first == "gamma 0" else 3, SamplingParams(), 0, payload)
    jobs = [head, *(DraftJob(backend.new_session(), c, 3, SamplingParams(), 0, payload) for c in rest)]
    blocks, _ = draft_blocks(backend, jobs, ended=lambda index: first != "gamma 0" and index == 0)
    assert (blocks[0] is None) == (first != "gamma 0")
    for got, expected in zip(blocks[1:], alone):
        assert_same_block(got, expected)


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_a_batch_of_verifies_equals_each_verify_alone(kind):
    """Different rules, alphas, block sizes and samplings in one batch: one verdict each, as alone."""
    drafter = backend_class(kind)(tiny_qwen2(VOCAB, seed=2), name="drafter")
    expert = backend_class(kind)(tiny_qwen2(VOCAB, seed=3), name="expert")
    cases = [(Rule.TOKEN, 0.3, 4, SAMPLINGS[0]), (Rule.TOKEN, 0.6, 4, SAMPLINGS[0]), (Rule.CHOW, 0.2, 2, SAMPLINGS[1]),
             (Rule.LOSSLESS, 0.0, 4, SAMPLINGS[2]), (Rule.OPT, 0.5, 3, SAMPLINGS[1]), (Rule.LOSSY, 0.3, 0, SAMPLINGS[0])]
    jobs_alone, jobs_together = [], []
    for i, ((rule, alpha, gamma, sampling), context) in enumerate(zip(cases, contexts() + contexts())):
        payload = DraftPayload.for_request(rule, sampling)
        (block,), _ = draft_blocks(drafter, [DraftJob(drafter.new_session(), context, gamma, sampling, i, payload)])
        for jobs in (jobs_alone, jobs_together):
            jobs.append(VerifyJob(expert.new_session(), list(context) + list(block.tokens), len(context), block,
                                  rule, alpha, sampling, 50 + i))
    alone = [verify_blocks_on(expert, [job])[0][0] for job in jobs_alone]
    together, times = verify_blocks_on(expert, jobs_together)
    assert together == alone
    assert times.forward_s > 0 and times.decide_s > 0


@pytest.mark.parametrize("rule", [Rule.LOSSLESS, Rule.CHOW, Rule.DIFF, Rule.TOKEN, Rule.TOKEN_V1, Rule.TOKEN_V2,
                                  Rule.LOSSY, Rule.OPT])
def test_greedy_verification_equals_verification_of_the_whole_distributions(rule):
    """The greedy path decides from a few numbers per position; its outcomes, over alphas from strict
    to lenient, are those of `cascade.verify_block` on the expert's rows and the drafter's rows
    rebuilt from the block."""
    expert_model = tiny_qwen2(VOCAB, seed=3)
    drafter = backend_class("hf")(perturbed_copy(expert_model, seed=4, scale=0.1), name="drafter")
    expert = backend_class("hf")(expert_model, name="expert")
    payload = DraftPayload.for_request(rule, GREEDY)
    alphas = {Rule.DIFF: (-0.3, -0.05, 0.0, 0.05, 0.3), Rule.LOSSY: (0.0, 0.5, 0.9)}.get(rule, (0.0, 0.1, 0.4, 0.7, 1.0))
    jobs = []
    for i, context in enumerate(contexts()):
        (block,), _ = draft_blocks(drafter, [DraftJob(drafter.new_session(), context, 4, GREEDY, i, payload)])
        for alpha in alphas:
            jobs.append(VerifyJob(expert.new_session(), list(context) + list(block.tokens), len(context), block,
                                  rule, alpha, GREEDY, i))
    outcomes, _ = verify_blocks_on(expert, jobs)
    scorer = backend_class("hf")(expert_model, name="scorer")
    for job, outcome in zip(jobs, outcomes):
        (p,) = scorer.score([ScoreJob(scorer.new_session(), job.sequence, job.start)])
        q, q_sample = densify(job.block, VOCAB, "cpu")
        expected = verify_block(rule, job.alpha, torch.tensor(job.block.tokens), q, p, GREEDY, q_sample=q_sample)
        assert (outcome.num_accepted, outcome.next_token, outcome.is_bonus, outcome.num_deferred) == (
            expected.num_accepted, expected.next_token, expected.is_bonus, expected.num_deferred), job.alpha
    assert len({outcome.num_accepted for outcome in outcomes}) > 1
    if rule not in (Rule.LOSSLESS, Rule.LOSSY):  # the alphas reach both sides of the rule's decisions
        assert len({outcome.num_deferred for outcome in outcomes}) > 1


def test_suppression_masks_only_the_positions_before_its_end_and_renormalises():
    import torch
    from speccascade.engine.jobs import with_suppression

    probs = torch.softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), dim=-1)
    sampling = SamplingParams(suppressed_ids=frozenset({2, 7}), suppressed_until=12)
    out = with_suppression(probs, [sampling] * 4, [10, 11, 12, 13])
    for row in (0, 1):  # positions 10 and 11: masked, the rest rescaled by the same factor
        assert out[row, [2, 7]].tolist() == [0.0, 0.0]
        kept = [i for i in range(10) if i not in (2, 7)]
        torch.testing.assert_close(out[row, kept], probs[row, kept] / probs[row, kept].sum())
    assert torch.equal(out[2:], probs[2:])  # from position 12 on, untouched
    assert with_suppression(probs, [SamplingParams()] * 4, [0, 1, 2, 3]) is probs
    # All the mass on a suppressed id: uniform over the others, never NaN.
    onehot = torch.zeros(1, 10).index_fill_(1, torch.tensor([2]), 1.0)
    uniform = with_suppression(onehot, [sampling], [0])
    assert uniform[0, [2, 7]].tolist() == [0.0, 0.0] and torch.allclose(uniform.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_drafts_and_verifies_never_choose_a_suppressed_token(kind):
    backend = backend_class(kind)(tiny_qwen2(VOCAB, seed=2), name=kind)
    context = contexts()[0]
    plain, _ = draft_blocks(backend, [DraftJob(backend.new_session(), context, 4, SamplingParams(), 1,
                                               DraftPayload.for_request(Rule.LOSSLESS, SamplingParams()))])
    banned = frozenset({plain[0].tokens[1]})  # the greedy draft's second token
    sampling = SamplingParams(suppressed_ids=banned, suppressed_until=len(context) + 3)
    payload = DraftPayload.for_request(Rule.LOSSLESS, sampling)
    (block,), _ = draft_blocks(backend, [DraftJob(backend.new_session(), context, 4, sampling, 1, payload)])
    assert block.tokens[0] == plain[0].tokens[0] and not set(block.tokens[:3]) & banned
    # The expert alone (an empty block) at a masked position: its greedy token is never the banned one.
    from speccascade.engine.blocks import EMPTY_BLOCK

    expert_context = context + [block.tokens[0]]
    unmasked, _ = verify_blocks_on(backend, [VerifyJob(backend.new_session(), expert_context, len(expert_context),
                                                       EMPTY_BLOCK, Rule.LOSSLESS, 0.0, SamplingParams(), 1)])
    masked_sampling = SamplingParams(suppressed_ids=frozenset({unmasked[0].next_token}),
                                     suppressed_until=len(expert_context) + 1)
    masked, _ = verify_blocks_on(backend, [VerifyJob(backend.new_session(), expert_context, len(expert_context),
                                                     EMPTY_BLOCK, Rule.LOSSLESS, 0.0, masked_sampling, 1)])
    assert masked[0].next_token != unmasked[0].next_token
