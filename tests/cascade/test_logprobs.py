"""The output distributions behind logprobs, on exact inputs: the token-specific and lossy targets
are those speculative sampling reproduces (`target_distribution`, itself tested statistically), the
mixture rules leave p for the engine to replace by q where a position did not defer, and the bonus
position is p. Plus the engine's merge of the drafter's log q into the expert's answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speccascade.cascade.logprobs import output_distributions
from speccascade.cascade.rules import target_distribution
from speccascade.engine.blocks import DraftedBlock, TokenLogprobs, VerifyOutcome
from speccascade.engine.jobs import VerifyJob, _merged_logprobs
from speccascade.options import GREEDY, Rule

V, GAMMA = 11, 3


def distributions(seed: int, *shape: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(*shape, V, generator=gen), dim=-1)


@pytest.mark.parametrize("rule,alphas", [(Rule.TOKEN, (0.2, 0.7)), (Rule.TOKEN_V1, (0.1, 0.5)),
                                         (Rule.TOKEN_V2, (0.05, 0.3)), (Rule.LOSSY, (0.0, 0.6))])
def test_blended_targets_are_the_rules_target_and_the_bonus_position_is_p(rule, alphas):
    q, p = distributions(0, 2, GAMMA), distributions(1, 2, GAMMA + 1)
    out = output_distributions(rule, torch.tensor(alphas, dtype=torch.float64), q, p)
    assert out.shape == (2, GAMMA + 1, V)
    for g, alpha in enumerate(alphas):
        torch.testing.assert_close(out[g, :GAMMA], target_distribution(rule, q[g], p[g, :GAMMA], alpha),
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out[g, GAMMA], p[g, GAMMA])
    torch.testing.assert_close(out.sum(-1), torch.ones(2, GAMMA + 1))


@pytest.mark.parametrize("rule", [Rule.LOSSLESS, Rule.CHOW, Rule.DIFF, Rule.OPT])
def test_mixture_rules_leave_p(rule):
    p = distributions(2, 1, GAMMA + 1)
    assert output_distributions(rule, torch.tensor([0.3], dtype=torch.float64), None, p) is p


def test_blended_targets_need_the_drafters_rows():
    with pytest.raises(ValueError, match="whole rows of q"):
        output_distributions(Rule.TOKEN, torch.tensor([0.3], dtype=torch.float64), None, distributions(3, 1, 2))


def _block(chosen, ids, values) -> DraftedBlock:
    return DraftedBlock(tokens=(4, 5, 6), max_q=np.zeros(3, np.float32), logprob_chosen=np.array(chosen, np.float32),
                        logprob_top_ids=np.array(ids, np.int32), logprob_top_values=np.array(values, np.float32))


@pytest.mark.parametrize("rule", [Rule.CHOW, Rule.DIFF, Rule.OPT])
def test_positions_that_did_not_defer_take_the_drafters_log_q(rule):
    block = _block([-0.1, -0.2, -0.3], [[4, 1], [5, 1], [6, 1]], [[-0.1, -2.0], [-0.2, -2.1], [-0.3, -2.2]])
    job = VerifyJob(None, [0, 4, 5, 6], 1, block, rule, 0.3, GREEDY, 0, logprobs=1)
    outcome = VerifyOutcome(num_accepted=2, next_token=9, is_bonus=False, num_deferred=2)
    arrays = {  # the expert side's (p) numbers for one block, four positions
        "chosen": np.array([[-1.0, -1.1, -1.2, -1.3]], np.float32),
        "top_ids": np.array([[[7, 8], [7, 8], [9, 8], [7, 8]]], np.int32),
        "top_values": np.array([[[-0.5, -0.6], [-0.5, -0.6], [-0.7, -0.8], [-0.5, -0.6]]], np.float32),
        "deferred": np.array([[False, True, True]]),
    }
    merged = _merged_logprobs(job, outcome, arrays, 0)
    assert len(merged) == 3  # two kept and the corrected token
    # Position 0 did not defer (pi = q: the drafter's numbers), 1 and 2 did (pi = p).
    assert merged.chosen.tolist() == pytest.approx([-0.1, -1.1, -1.2])
    assert merged.top_ids.tolist() == [[4], [7], [9]]
    assert merged.top_values[:, 0].tolist() == pytest.approx([-0.1, -0.5, -0.7])


def test_lossless_and_blended_rules_keep_the_expert_sides_numbers():
    block = _block([-0.1, -0.2, -0.3], [[4], [5], [6]], [[-0.1], [-0.2], [-0.3]])
    arrays = {"chosen": np.array([[-1.0, -1.1, -1.2, -1.3]], np.float32),
              "top_ids": np.zeros((1, 4, 1), np.int32), "top_values": np.zeros((1, 4, 1), np.float32),
              "deferred": np.array([[False, False, False]])}
    outcome = VerifyOutcome(num_accepted=3, next_token=9, is_bonus=True, num_deferred=0)
    for rule in (Rule.LOSSLESS, Rule.TOKEN, Rule.LOSSY):
        job = VerifyJob(None, [0, 4, 5, 6], 1, block, rule, 0.3, GREEDY, 0, logprobs=1)
        assert _merged_logprobs(job, outcome, arrays, 0).chosen.tolist() == pytest.approx([-1.0, -1.1, -1.2, -1.3])


def test_token_logprobs_travel_small():
    a = TokenLogprobs(np.zeros(2, np.float32), np.zeros((2, 3), np.int32), np.zeros((2, 3), np.float32))
    assert len(a) == 2 and a.nbytes == 2 * (4 + 2 * 3 * 4)  # k + 1 numbers and k ids a position
    outcome = VerifyOutcome(1, 2, False, 0, logprobs=a)
    assert outcome.nbytes == 16 + a.nbytes
