"""Deferral rules and the target distributions they define.

For one position, `q` is the drafter's next-token distribution and `p` the expert's, both
`[..., V]` over the same vocabulary. A rule decides whether the position *defers* to the expert
(`r = 1`); the speculative cascade then samples against the target

    pi = (1 - r) * q + r * p                       (chow, diff, opt)
    pi(v) = q(v) * 1[v in A] + p(v) * q(A^c)       (the token-specific rules), with
        A = {v : p(v) >= (1 - alpha) max p}        token    (the paper's V3)
        A = {v : q(v) >= max p - alpha}            token_v1
        A = {v : p(v) >= max p - alpha}            token_v2

`lossless` is pi = p (ordinary speculative decoding). `lossy` speculative decoding has no mixture
target; `target_distribution("lossy", ...)` returns the distribution its acceptance rule actually
produces, so it can be tested the same way.

alpha is the trade-off knob; larger alpha always means more lenient (fewer deferrals).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import Rule, validate_alpha

# Mass below this counts as "none" when deciding whether a token-rule target differs from q: a
# softmax never produces exact zeros, and mass of 1e-6 changes nothing observable.
NEGLIGIBLE_MASS = 1e-6


def per_row(value: "float | Tensor", like: Tensor) -> "float | Tensor":
    """A rule's scalar (alpha, or 1 - alpha), or one per leading row of a batch ([G] float64),
    shaped to broadcast against `like` and in its dtype. Computed in float64 on the way and cast
    once, a batch row decides exactly as the same alpha given as a Python float does."""
    if isinstance(value, Tensor):
        return value.to(like.dtype).view(value.shape[0], *([1] * (like.dim() - 1)))
    return value


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """D_TV(p, q) = sum_v max(0, q(v) - p(v)) over the last dim: [..., V] -> [...]."""
    return (q - p).clamp_min(0).sum(dim=-1)


def token_accept_set(rule: Rule, q: Tensor, p: Tensor, alpha: "float | Tensor") -> Tensor:
    """A, the tokens a token-specific rule keeps from the drafter: [..., V] -> [..., V] bool.
    `token` (V3): those the expert finds nearly as good as its best, relatively; `token_v2`: the
    same, additively; `token_v1`: those the drafter rates nearly as high as the expert rates its
    best. (Every alpha may be one per leading row: `per_row`.)"""
    return token_in_accept_set(rule, q, p, p.amax(dim=-1, keepdim=True), alpha)


def token_in_accept_set(rule: Rule, q: Tensor, p: Tensor, max_p: Tensor, alpha: "float | Tensor") -> Tensor:
    """Whether tokens are in A, from q and p at those tokens and max p at their positions (broadcast
    against them): all that deciding one token's membership reads, so greedy verification decides
    its drafted tokens without the rest of the vocabulary."""
    if rule is Rule.TOKEN:
        return p >= per_row(1.0 - alpha, p) * max_p
    if rule is Rule.TOKEN_V2:
        return p >= max_p - per_row(alpha, p)
    if rule is Rule.TOKEN_V1:
        return q >= max_p - per_row(alpha, p)
    raise ValueError(f"rule {rule.value!r} is not a token-specific rule")


def mixture_defers(rule: Rule, q: Tensor, p: Tensor | None, alpha: "float | Tensor") -> Tensor:
    """r for the mixture rules (lossless, chow, diff, opt): [..., V] -> [...] bool."""
    if rule in (Rule.LOSSLESS, Rule.CHOW):
        return confidence_defers(rule, q.amax(dim=-1), None, alpha)
    if p is None:
        raise ValueError(f"rule {rule.value!r} needs the expert distribution p to decide")
    distance = total_variation(p, q) if rule is Rule.OPT else None
    return confidence_defers(rule, q.amax(dim=-1), p.amax(dim=-1), alpha, distance)


def confidence_defers(rule: Rule, max_q: Tensor, max_p: Tensor | None, alpha: "float | Tensor",
                      distance: Tensor | None = None) -> Tensor:
    """r for the mixture rules from the models' confidences max q and max p ([...] each) and, for
    opt, D_TV(p, q): all the rules read of the distributions."""
    if rule is Rule.LOSSLESS:
        return torch.ones_like(max_q, dtype=torch.bool)
    if rule is Rule.CHOW:
        return max_q < per_row(1.0 - alpha, max_q)
    if max_p is None:
        raise ValueError(f"rule {rule.value!r} needs the expert distribution p to decide")
    if rule is Rule.DIFF:
        return max_q < max_p - per_row(alpha, max_p)
    if rule is Rule.OPT:
        if distance is None:
            raise ValueError("rule 'opt' needs D_TV(p, q) to decide")
        return max_q < max_p - per_row(alpha, max_p) * distance
    raise ValueError(f"rule {rule.value!r} is not a mixture rule")


def token_target(q: Tensor, p: Tensor, accept_set: Tensor) -> Tensor:
    """pi(v) = q(v) 1[v in A] + p(v) q(A^c): keep the drafter's mass on tokens in A and hand the
    rest to the expert. Rows sum to 1 because sum_v p(v) = 1."""
    kept = torch.where(accept_set, q, torch.zeros_like(q))
    handed_over = 1.0 - kept.sum(dim=-1, keepdim=True)
    return kept + p * handed_over.clamp_min(0)


def token_defers(q: Tensor, accept_set: Tensor) -> Tensor:
    """For the token rule a position 'defers' when its target differs from q, i.e. q puts
    non-negligible mass outside A: [..., V] -> [...] bool."""
    outside = torch.where(accept_set, torch.zeros_like(q), q).sum(dim=-1)
    return outside > NEGLIGIBLE_MASS


def lossy_accept_probability(q: Tensor, p: Tensor, alpha: "float | Tensor") -> Tensor:
    """Per-token acceptance of lossy speculative decoding, min(1, p / ((1 - alpha) q)): [..., V]."""
    return (p / (per_row(1.0 - alpha, q) * q)).nan_to_num(nan=1.0, posinf=1.0).clamp(max=1.0)


def residual(target: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, target - q)) over the last dim, the distribution a rejected position is
    resampled from. A row with no positive mass (target == q up to rounding; a rejection cannot
    happen there) falls back to the target itself."""
    diff = (target - q).clamp_min(0)
    mass = diff.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, diff / mass.clamp_min(torch.finfo(diff.dtype).tiny), target)


def defers(rule: "str | Rule", q: Tensor, p: Tensor, alpha: float) -> Tensor:
    """The deferral decision r per position: [..., V] x [..., V] -> [...] bool.

    For the token-specific rules, r says whether the position's target differs from q. For
    `lossy`, every position is checked against p, so every position defers.
    """
    rule = Rule.parse(rule)
    alpha = validate_alpha(rule, alpha)
    if rule.is_token_specific:
        return token_defers(q, token_accept_set(rule, q, p, alpha))
    if rule is Rule.LOSSY:
        return torch.ones(q.shape[:-1], dtype=torch.bool, device=q.device)
    return mixture_defers(rule, q, p, alpha)


def target_distribution(rule: "str | Rule", q: Tensor, p: Tensor, alpha: float) -> Tensor:
    """The distribution pi [..., V] that speculative sampling against (q, p) reproduces."""
    rule = Rule.parse(rule)
    alpha = validate_alpha(rule, alpha)
    q = q.float()
    p = p.float()
    if rule.is_token_specific:
        return token_target(q, p, token_accept_set(rule, q, p, alpha))
    if rule is Rule.LOSSY:
        # P(emit v) = q(v) * accept(v) + P(reject) * residual(v), with residual norm(max(0, p - q)).
        kept = q * lossy_accept_probability(q, p, alpha)
        rejected_mass = (1.0 - kept.sum(dim=-1, keepdim=True)).clamp_min(0)
        return kept + rejected_mass * residual(p, q)
    r = mixture_defers(rule, q, p, alpha).unsqueeze(-1)
    return torch.where(r, p, q)
