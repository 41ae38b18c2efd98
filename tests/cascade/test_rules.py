import math

import pytest
import torch
from speccascade.cascade import (
    ALWAYS_DEFER_ALPHA,
    NEVER_DEFER_ALPHA,
    Rule,
    defers,
    target_distribution,
    total_variation,
    validate_alpha,
)

V = 7


def random_dists(n: int, seed: int, sharp: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, V, generator=gen) * sharp, dim=-1)


def reference_target(rule: str, q: torch.Tensor, p: torch.Tensor, alpha: float) -> torch.Tensor:
    """The formulas of DESIGN.md §1 written out element by element."""
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        qi, pi_ = q[i].tolist(), p[i].tolist()
        dtv = sum(max(0.0, a - b) for a, b in zip(qi, pi_))
        if rule == "lossless":
            r = 1
        elif rule == "chow":
            r = max(qi) < 1 - alpha
        elif rule == "diff":
            r = max(qi) < max(pi_) - alpha
        elif rule == "opt":
            r = max(qi) < max(pi_) - alpha * dtv
        elif rule in ("token", "token_v1", "token_v2"):
            in_a = {"token": [pv >= (1 - alpha) * max(pi_) for pv in pi_],  # the paper's V3
                    "token_v2": [pv >= max(pi_) - alpha for pv in pi_],
                    "token_v1": [qv >= max(pi_) - alpha for qv in qi]}[rule]
            outside = sum(qv for qv, a in zip(qi, in_a) if not a)
            out[i] = torch.tensor([qv * a + pv * outside for qv, pv, a in zip(qi, pi_, in_a)])
            continue
        out[i] = torch.tensor(pi_ if r else qi)
    return out


@pytest.mark.parametrize("rule,alpha", [
    ("lossless", 0.0), ("chow", 0.4), ("chow", 0.8), ("diff", 0.0), ("diff", 0.2), ("diff", -0.3),
    ("opt", 0.3), ("opt", 0.9), ("token", 0.1), ("token", 0.5), ("token", 0.9),
    ("token_v1", 0.0), ("token_v1", 0.1), ("token_v1", 0.4), ("token_v2", 0.0), ("token_v2", 0.1), ("token_v2", 0.4),
])
def test_target_distribution_matches_formula(rule, alpha):
    q, p = random_dists(200, 1), random_dists(200, 2)
    got = target_distribution(rule, q, p, alpha)
    torch.testing.assert_close(got, reference_target(rule, q, p, alpha))
    torch.testing.assert_close(got.sum(-1), torch.ones(200))


def test_target_distribution_takes_both_branches_on_random_inputs():
    # Guards the formula test above against inputs where a rule never (or always) defers.
    q, p = random_dists(200, 1), random_dists(200, 2)
    for rule, alpha in [("chow", 0.4), ("diff", 0.0), ("opt", 0.3)]:
        r = defers(rule, q, p, alpha)
        assert 0 < int(r.sum()) < 200, rule
    # token: a softmax q always has mass outside A, so the target is a true blend of q and p.
    target = target_distribution("token", q, p, 0.5)
    assert not torch.allclose(target, q) and not torch.allclose(target, p)


def test_lossy_target_is_the_distribution_its_acceptance_produces():
    q, p = random_dists(50, 3), random_dists(50, 4)
    alpha = 0.4
    accept = (p / ((1 - alpha) * q)).clamp(max=1)
    kept = q * accept
    resid = (p - q).clamp_min(0)
    resid = resid / resid.sum(-1, keepdim=True)
    expected = kept + (1 - kept.sum(-1, keepdim=True)) * resid
    torch.testing.assert_close(target_distribution("lossy", q, p, alpha), expected)
    torch.testing.assert_close(target_distribution("lossy", q, p, 0.0), p)


def test_total_variation_is_half_l1():
    q, p = random_dists(20, 5), random_dists(20, 6)
    torch.testing.assert_close(total_variation(p, q), 0.5 * (p - q).abs().sum(-1))


def test_hand_built_chow_decisions():
    confident = torch.tensor([[0.9, 0.05, 0.05]])
    unsure = torch.tensor([[0.4, 0.3, 0.3]])
    p = torch.tensor([[0.1, 0.8, 0.1]])
    assert not defers("chow", confident, p, 0.2)  # 0.9 >= 0.8
    assert defers("chow", unsure, p, 0.2)  # 0.4 < 0.8
    torch.testing.assert_close(target_distribution("chow", confident, p, 0.2), confident)
    torch.testing.assert_close(target_distribution("chow", unsure, p, 0.2), p)


def test_hand_built_diff_and_opt_decisions():
    q = torch.tensor([[0.5, 0.5, 0.0]])
    p = torch.tensor([[0.0, 0.1, 0.9]])
    # max q = 0.5, max p = 0.9, D_TV = 0.9
    assert defers("diff", q, p, 0.3)  # 0.5 < 0.6
    assert not defers("diff", q, p, 0.5)  # 0.5 < 0.4 is false
    assert defers("opt", q, p, 0.4)  # 0.5 < 0.9 - 0.36
    assert not defers("opt", q, p, 0.5)  # 0.5 < 0.45 is false


def test_hand_built_token_target():
    q = torch.tensor([[0.6, 0.3, 0.1]])
    p = torch.tensor([[0.5, 0.3, 0.2]])
    # alpha=0.5: A = {v: p(v) >= 0.25} = {0, 1}; mass outside A under q = 0.1 goes to p.
    expected = torch.tensor([[0.6 + 0.05, 0.3 + 0.03, 0.02]])
    torch.testing.assert_close(target_distribution("token", q, p, 0.5), expected)
    assert defers("token", q, p, 0.5)
    assert not defers("token", torch.tensor([[0.7, 0.3, 0.0]]), p, 0.5)


def test_hand_built_token_v1_and_v2_targets():
    q = torch.tensor([[0.6, 0.3, 0.1]])
    p = torch.tensor([[0.5, 0.3, 0.2]])
    # token_v2, alpha=0.25: A = {v: p(v) >= 0.25} = {0, 1}, as token at 0.5 (relative 0.5 * 0.5).
    torch.testing.assert_close(target_distribution("token_v2", q, p, 0.25), target_distribution("token", q, p, 0.5))
    # token_v2, alpha=0.1: A = {v: p(v) >= 0.4} = {0}; q's mass outside it, 0.4, goes to p.
    torch.testing.assert_close(target_distribution("token_v2", q, p, 0.1), torch.tensor([[0.6 + 0.2, 0.12, 0.08]]))
    # token_v1 reads the drafter: alpha=0.15: A = {v: q(v) >= 0.35} = {0}; at 0.25: {0, 1}.
    torch.testing.assert_close(target_distribution("token_v1", q, p, 0.15), torch.tensor([[0.6 + 0.2, 0.12, 0.08]]))
    torch.testing.assert_close(target_distribution("token_v1", q, p, 0.25), torch.tensor([[0.65, 0.33, 0.02]]))
    # token_v1 keeps what the drafter rates highly even where the expert does not: at alpha 0.15,
    # A = {v: q(v) >= 0.35} = {0, 1} holds all of q (no deferral); token_v2's {v: p(v) >= 0.35} = {1}
    # does not.
    q, p = torch.tensor([[0.65, 0.35, 0.0]]), torch.tensor([[0.2, 0.5, 0.3]])
    assert not defers("token_v1", q, p, 0.15) and defers("token_v2", q, p, 0.15)
    torch.testing.assert_close(target_distribution("token_v1", q, p, 0.15), q)


@pytest.mark.parametrize("rule", list(NEVER_DEFER_ALPHA))
def test_never_defer_end_targets_q(rule):
    q, p = random_dists(100, 7), random_dists(100, 8)
    alpha = NEVER_DEFER_ALPHA[rule]
    assert not defers(rule, q, p, alpha).any()
    torch.testing.assert_close(target_distribution(rule, q, p, alpha), q)


@pytest.mark.parametrize("rule", list(ALWAYS_DEFER_ALPHA))
def test_always_defer_end_targets_p(rule):
    q, p = random_dists(100, 9), random_dists(100, 10)
    alpha = ALWAYS_DEFER_ALPHA[rule]
    assert defers(rule, q, p, alpha).all()
    torch.testing.assert_close(target_distribution(rule, q, p, alpha), p)


@pytest.mark.parametrize("rule,alpha,fragment", [
    ("chow", math.nan, "alpha must be a number"),
    ("chow", 1.5, "alpha=1.5 is out of range for rule 'chow'"),
    ("chow", -0.1, "out of range"),
    ("diff", -1.5, "out of range for rule 'diff'"),
    ("lossy", 1.0, "out of range for rule 'lossy'"),
    ("token", float("inf"), "out of range"),
    ("chow", "0.5", "alpha must be a number"),
])
def test_bad_alpha_is_named(rule, alpha, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        validate_alpha(rule, alpha)


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown rule 'fast'.*lossless, chow, diff, opt, token, token_v1, token_v2, lossy"):
        target_distribution("fast", random_dists(1, 0), random_dists(1, 1), 0.5)


def test_only_chow_decides_without_the_expert():
    assert [r for r in Rule if not r.needs_expert_to_decide] == [Rule.CHOW]
