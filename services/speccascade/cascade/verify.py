"""Speculative sampling of one drafted block against a rule's target (Leviathan et al. 2023,
Chen et al. 2023; the cascade targets of Narasimhan et al. 2025).

Decisions (r, the token rule's set A) are made on the temperature-1 distributions; acceptance and
the residual use the sampling distributions (temperature / top-k / top-p applied), as in the
authors' reference implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import Rule, SamplingParams, validate_alpha
from .rules import lossy_accept_probability, mixture_defers, residual, token_accept_set, token_defers, token_target
from .sampling import adjust_probs, sample


@dataclass(frozen=True)
class BlockVerdict:
    num_accepted: int  # drafted tokens kept, 0..gamma
    next_token: int  # the corrected token (num_accepted < gamma) or the bonus token
    is_bonus: bool
    deferred: Tensor  # [gamma] bool, the rule's decision at every drafted position

    @property
    def num_deferred(self) -> int:
        return int(self.deferred.sum())


def acceptance(
    rule: Rule,
    alpha: float,
    q_decide: Tensor,  # [gamma, V] drafter, temperature 1
    p_decide: Tensor,  # [gamma, V] expert, temperature 1
    q_sample: Tensor,  # [gamma, V] drafter, as sampled from
    p_sample: Tensor,  # [gamma, V] expert, as sampled from
) -> tuple[Tensor, Tensor, Tensor]:
    """Per drafted position, returns
    - accept_table [gamma, V]: probability of keeping each token v had it been drafted,
    - residual_source [gamma, V]: the distribution whose excess over q a rejection resamples from
      (the target pi; p for lossy),
    - deferred [gamma] bool: the rule's decision.
    """
    if rule is Rule.LOSSY:
        accept_table = lossy_accept_probability(q_sample, p_sample, alpha)
        deferred = torch.ones(q_sample.shape[:-1], dtype=torch.bool, device=q_sample.device)
        return accept_table, p_sample, deferred
    if rule is Rule.TOKEN:
        accept_set = token_accept_set(p_decide, alpha)
        target = token_target(q_sample, p_sample, accept_set)
        deferred = token_defers(q_sample, accept_set)
    else:
        deferred = mixture_defers(rule, q_decide, p_decide, alpha)
        target = torch.where(deferred.unsqueeze(-1), p_sample, q_sample)
    # Accept x with probability min(1, pi(x) / q(x)); q(x) > 0 because x was drawn from q.
    accept_table = (target / q_sample).nan_to_num(nan=1.0, posinf=1.0).clamp(max=1.0)
    return accept_table, target, deferred


def verify_block(
    rule: "str | Rule",
    alpha: float,
    draft_tokens: Tensor,  # [gamma] int64
    q: Tensor,  # [gamma, V] drafter distributions (temperature 1) at the drafted positions
    p: Tensor,  # [gamma + 1, V] expert distributions (temperature 1); the last is the bonus position
    sampling: SamplingParams,
    generator: torch.Generator | None = None,
    q_sample: Tensor | None = None,  # [gamma, V] adjust_probs(q, sampling), if already known
) -> BlockVerdict:
    """Accept a prefix of the drafted block and produce one more token from the expert side.

    With greedy sampling this is deterministic and draws nothing from `generator`.

    `q_sample` lets a caller that only has the drafter's sampling distributions (e.g. sparse
    top-k / top-p rows shipped over the network) pass them directly; `q` is then only used to
    decide deferral (its max for chow/diff, all of it for opt).
    """
    rule = Rule.parse(rule)
    alpha = validate_alpha(rule, alpha)
    gamma = draft_tokens.shape[0]
    if q.shape[0] != gamma or p.shape[0] != gamma + 1 or q.shape[-1] != p.shape[-1]:
        raise ValueError(
            f"verify_block needs q [gamma, V] and p [gamma + 1, V] for gamma={gamma} drafted "
            f"tokens; got q {tuple(q.shape)} and p {tuple(p.shape)}"
        )
    q = q.float()
    p = p.float()
    q_sample = adjust_probs(q, sampling) if q_sample is None else q_sample.float()
    p_sample = adjust_probs(p, sampling)

    accept_table, residual_source, deferred = acceptance(
        rule, alpha, q, p[:gamma], q_sample, p_sample[:gamma]
    )
    accept_prob = accept_table.gather(-1, draft_tokens.view(-1, 1)).squeeze(-1)  # [gamma]
    if sampling.is_greedy:
        accepted = accept_prob > 0.5  # exactly 0 or 1 with one-hot distributions
    else:
        accepted = torch.rand(gamma, generator=generator, device=accept_prob.device) < accept_prob
    rejected_at = (~accepted).nonzero()
    num_accepted = int(rejected_at[0, 0]) if rejected_at.numel() else gamma

    if num_accepted < gamma:
        # Corrected token: y ~ norm(max(0, pi_j - q_j)) at the first rejected position j.
        resample_from = residual(residual_source[num_accepted], q_sample[num_accepted])
        is_bonus = False
    else:
        resample_from = p_sample[gamma]
        is_bonus = True
    next_token = int(sample(resample_from, generator, greedy=sampling.is_greedy))
    return BlockVerdict(num_accepted, next_token, is_bonus, deferred)
