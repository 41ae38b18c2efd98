"""The distribution each output token of a verified block comes from, for the logprobs a request
may ask for.

Speculative sampling against a target pi emits, at every position, a token distributed exactly as
pi (Leviathan et al. 2023): a drafted token x ~ q kept with probability min(1, pi(x) / q(x)),
else one drawn from norm(max(0, pi - q)), has P(emit v) = pi(v). So the log-probability of an
output token is log pi(token) at its position, whatever the path that produced it (kept from the
drafter, corrected, or the bonus). A bonus token is drawn from the expert's p at the position
after the block (`verify_blocks`), so there the output distribution is p.

As vLLM reports the model's raw log-probabilities (before temperature, top-k, top-p), these are
the temperature-1 distributions: pi built by the rule from the temperature-1 q and p, with the
decisions the block was verified with. (They are those of the distributions the tiers hold, after
min_tokens' mask of end-of-sequence ids, where vLLM reports the unmasked ones.) Per rule:

    lossless                 pi = p
    chow, diff, opt          pi = p where the position deferred, q where it did not
    token, token_v1/v2       pi(v) = q(v) 1[v in A] + p(v) q(A^c)
    lossy                    pi(v) = q(v) min(1, p(v) / ((1 - alpha) q(v))) + P(reject) norm(max(0, p - q))(v)

For the mixture rules this module returns p at every position: where a position did not defer its
pi is q, which the expert does not hold (only max q travels), and the drafter's own log q (shipped
with the block for logprobs requests) is used there instead (`engine.jobs`). The token-specific
and lossy targets blend q and p per token, so they need q's whole rows, which a logprobs request's
block carries in float32 for these rules.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import Rule
from .rules import lossy_accept_probability, residual, token_accept_set, token_target


def output_distributions(
    rule: Rule,
    alpha: Tensor,  # [G] float64, one per block
    q: Tensor | None,  # [G, gamma, V] exact temperature-1 q (token-specific and lossy rules only)
    p: Tensor,  # [G, gamma + 1, V] temperature-1 p; the last row is the bonus position
) -> Tensor:
    """[G, gamma + 1, V]: the temperature-1 distribution each position's output token is drawn from
    (the mixture rules: p everywhere, see the module docstring)."""
    gamma = p.shape[1] - 1
    if not gamma or not (rule.is_token_specific or rule is Rule.LOSSY):
        return p
    if q is None:
        raise ValueError(f"the {rule.value} rule's output distribution needs the drafter's whole rows of q")
    q, head = q.float(), p[:, :gamma].float()
    if rule is Rule.LOSSY:
        # P(emit v) = q(v) accept(v) + P(reject) residual(v): the distribution lossy's acceptance
        # rule produces (it has no mixture target; `rules.target_distribution` says the same).
        kept = q * lossy_accept_probability(q, head, alpha)
        rejected = (1.0 - kept.sum(dim=-1, keepdim=True)).clamp_min(0)
        target = kept + rejected * residual(head, q)
    else:
        target = token_target(q, head, token_accept_set(rule, q, head, alpha))
    return torch.cat([target, p[:, gamma:].float()], dim=1)
