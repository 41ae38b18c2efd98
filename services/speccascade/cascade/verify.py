"""Speculative sampling of drafted blocks against a rule's target (Leviathan et al. 2023,
Chen et al. 2023; the cascade targets of Narasimhan et al. 2025).

Decisions (r, the token rule's set A) are made on the temperature-1 distributions; acceptance and
the residual use the sampling distributions (temperature / top-k / top-p applied), as in the
authors' reference implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import Rule, SamplingParams, validate_alpha
from .rules import (
    confidence_defers,
    lossy_accept_probability,
    mixture_defers,
    residual,
    token_accept_set,
    token_defers,
    token_in_accept_set,
    token_target,
)
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
    alpha: "float | Tensor",  # or one per block of a batch ([G] float64, see rules.per_row)
    q_decide: Tensor,  # [..., gamma, V] drafter, temperature 1
    p_decide: Tensor,  # [..., gamma, V] expert, temperature 1
    q_sample: Tensor,  # [..., gamma, V] drafter, as sampled from
    p_sample: Tensor,  # [..., gamma, V] expert, as sampled from
) -> tuple[Tensor, Tensor, Tensor]:
    """Per drafted position (of one block, or of a batch of blocks), returns
    - accept_table [gamma, V]: probability of keeping each token v had it been drafted,
    - residual_source [gamma, V]: the distribution whose excess over q a rejection resamples from
      (the target pi; p for lossy),
    - deferred [gamma] bool: the rule's decision.
    """
    if rule is Rule.LOSSY:
        accept_table = lossy_accept_probability(q_sample, p_sample, alpha)
        deferred = torch.ones(q_sample.shape[:-1], dtype=torch.bool, device=q_sample.device)
        return accept_table, p_sample, deferred
    if rule.is_token_specific:
        accept_set = token_accept_set(rule, q_decide, p_decide, alpha)
        target = token_target(q_sample, p_sample, accept_set)
        deferred = token_defers(q_sample, accept_set)
    else:
        deferred = mixture_defers(rule, q_decide, p_decide, alpha)
        target = torch.where(deferred.unsqueeze(-1), p_sample, q_sample)
    # Accept x with probability min(1, pi(x) / q(x)); q(x) > 0 because x was drawn from q.
    accept_table = (target / q_sample).nan_to_num(nan=1.0, posinf=1.0).clamp(max=1.0)
    return accept_table, target, deferred


@dataclass(frozen=True)
class BatchVerdict:
    """The verdicts of G blocks of one gamma, verified together; every tensor is on the device."""

    num_accepted: Tensor  # [G] int64, drafted tokens kept, 0..gamma
    next_token: Tensor  # [G] int64, the corrected token (num_accepted < gamma) or the bonus token
    is_bonus: Tensor  # [G] bool
    deferred: Tensor  # [G, gamma] bool, the rule's decision at every drafted position


def verify_blocks(
    rule: "str | Rule",
    alphas: "Sequence[float]",
    draft_tokens: Tensor,  # [G, gamma] int64
    q: Tensor,  # [G, gamma, V] drafter distributions (temperature 1) at the drafted positions
    p: Tensor,  # [G, gamma + 1, V] expert distributions (temperature 1); the last is the bonus position
    sampling: SamplingParams,
    generators: "Sequence[torch.Generator] | None" = None,  # one per block (sampling only)
    q_sample: Tensor | None = None,  # [G, gamma, V] adjust_probs(q, sampling), if already known
    bonus_generators: "Sequence[torch.Generator] | None" = None,  # one per block: draws the bonus token
) -> BatchVerdict:
    """Speculative sampling of G drafted blocks (one rule, one gamma, one sampling; an alpha per
    block) in one set of tensor operations: each block keeps a prefix of its drafted tokens and
    gets one more token from the expert side.

    Each block's draws come from its own generator, in the order a block verified alone draws
    them (gamma uniforms, then the corrected token), so a block's verdict does not depend on the
    others in the batch. The bonus token (every drafted token kept) is drawn from
    `bonus_generators` where given, else from `generators` after the uniforms. The decoding loop
    passes the generator the drafter draws its own token at the bonus position with: both draws
    take the same uniform (`sample`), so the drafter's guess at the bonus, which a pre-draft builds
    on, is the bonus itself whenever p's and q's cumulative distributions put that uniform on the
    same token (always, where they agree), not only by chance. The bonus is still distributed as
    p: that uniform has decided nothing before (the drafter's token at that position was never
    drawn into the output). Greedy verification is deterministic and draws nothing."""
    rule = Rule.parse(rule)
    alpha = torch.tensor([validate_alpha(rule, a) for a in alphas], dtype=torch.float64)
    blocks, gamma = draft_tokens.shape
    if q.shape[:2] != (blocks, gamma) or p.shape[:2] != (blocks, gamma + 1) or q.shape[-1] != p.shape[-1] \
            or alpha.shape[0] != blocks:
        raise ValueError(
            f"verify_blocks needs q [G, gamma, V], p [G, gamma + 1, V] and G alphas for {blocks} blocks of "
            f"gamma={gamma}; got q {tuple(q.shape)}, p {tuple(p.shape)} and {alpha.shape[0]} alphas"
        )
    if not sampling.is_greedy and (generators is None or len(generators) != blocks):
        raise ValueError(f"sampled verification needs one generator per block ({blocks})")
    if not sampling.is_greedy and bonus_generators is not None and len(bonus_generators) != blocks:
        raise ValueError(f"sampled verification takes one bonus generator per block ({blocks}), "
                         f"got {len(bonus_generators)}")
    q = q.float()
    p = p.float()
    q_sample = adjust_probs(q, sampling) if q_sample is None else q_sample.float()
    p_sample = adjust_probs(p, sampling)
    rows = torch.arange(blocks, device=p.device)

    accept_table, residual_source, deferred = acceptance(rule, alpha, q, p[:, :gamma], q_sample, p_sample[:, :gamma])
    accept_prob = accept_table.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # [G, gamma]
    if sampling.is_greedy:
        accepted = accept_prob > 0.5  # exactly 0 or 1 with one-hot distributions
    else:
        uniforms = torch.stack([torch.rand(gamma, generator=g, device=p.device) for g in generators])
        accepted = uniforms < accept_prob
    # The first rejected position, or gamma when all are kept: the count of leading kept ones.
    num_accepted = accepted.int().cumprod(dim=-1).sum(dim=-1)
    is_bonus = num_accepted == gamma
    resample_from = p_sample[:, gamma]  # [G, V]: the bonus position
    if gamma:
        # Corrected token: y ~ norm(max(0, pi_j - q_j)) at the first rejected position j.
        j = num_accepted.clamp(max=gamma - 1)
        corrected_from = residual(residual_source[rows, j], q_sample[rows, j])
        resample_from = torch.where(is_bonus.unsqueeze(-1), resample_from, corrected_from)
    if sampling.is_greedy:
        next_token = resample_from.argmax(dim=-1)
    elif bonus_generators is None:
        next_token = torch.cat([sample(resample_from[i: i + 1], g, greedy=False) for i, g in enumerate(generators)])
    else:
        # Both candidates drawn, the verdict picks one on the device (no host sync to choose).
        bonus = torch.cat([sample(p_sample[i: i + 1, gamma], g, greedy=False) for i, g in enumerate(bonus_generators)])
        if gamma:
            # From resample_from, not corrected_from: a kept block's residual row may have no mass.
            corrected = torch.cat([sample(resample_from[i: i + 1], g, greedy=False) for i, g in enumerate(generators)])
            next_token = torch.where(is_bonus, bonus, corrected)
        else:
            next_token = bonus
    return BatchVerdict(num_accepted, next_token, is_bonus, deferred)


@dataclass(frozen=True)
class GreedyEvidence:
    """What greedy verification reads of G blocks' distributions (temperature 1): the drafter's q and
    the expert's p at each drafted token, the maxima, and the expert's argmax, which is its greedy
    token ([G, gamma] each; the expert's over gamma + 1 positions, the last the bonus position)."""

    max_q: Tensor
    q_drafted: Tensor
    max_p: Tensor  # [G, gamma + 1]
    argmax_p: Tensor  # [G, gamma + 1] int64, the first index on ties
    p_drafted: Tensor

    @classmethod
    def of(cls, draft_tokens: Tensor, q: Tensor, p: Tensor) -> "GreedyEvidence":
        """From whole distributions: q [G, gamma, V], p [G, gamma + 1, V]."""
        q = q.float()
        return cls(q.amax(dim=-1), q.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1),
                   *cls.of_expert(draft_tokens, p))

    @staticmethod
    def of_expert(draft_tokens: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The expert's part, (max_p, argmax_p, p_drafted), from p [..., gamma + 1, V] and the drafted
        tokens [..., gamma]."""
        p = p.float()
        drafted = p[..., : draft_tokens.shape[-1], :].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
        return p.amax(dim=-1), p.argmax(dim=-1), drafted


def verify_greedy_blocks(
    rule: "str | Rule",
    alphas: "Sequence[float]",
    draft_tokens: Tensor,  # [G, gamma] int64, each the drafter's greedy token
    evidence: GreedyEvidence,
) -> BatchVerdict:
    """`verify_blocks` with greedy sampling, deciding from a few numbers per position instead of
    whole distributions: the verdicts are the same, bit for bit (the same comparisons on the same
    float32 values).

    Greedy, the drafter samples from the one-hot at each drafted token x and the expert from the
    one-hot at its argmax a, so every target pi is one of those two one-hots: x is kept iff pi = 1_x,
    i.e. the position does not defer, or x = a, or (token rules) x is in A; the first rejected
    position's residual norm(max(0, 1_a - 1_x)) is 1_a, and so is the bonus position's. What a rule
    decides from reads max q, max p, and q and p at x, never the rest of the vocabulary; opt's
    D_TV(p, q) reads all of it, so opt is verified whole (`verify_blocks`)."""
    rule = Rule.parse(rule)
    if rule is Rule.OPT:
        raise ValueError("rule 'opt' decides from D_TV(p, q), all of both distributions: verify it with verify_blocks")
    alpha = torch.tensor([validate_alpha(rule, a) for a in alphas], dtype=torch.float64)
    blocks, gamma = draft_tokens.shape
    if evidence.max_p.shape != (blocks, gamma + 1) or evidence.max_q.shape != (blocks, gamma) \
            or alpha.shape[0] != blocks:
        raise ValueError(
            f"verify_greedy_blocks needs evidence for {blocks} blocks of gamma={gamma} ([G, gamma] for q, "
            f"[G, gamma + 1] for p) and G alphas; got max q {tuple(evidence.max_q.shape)}, max p "
            f"{tuple(evidence.max_p.shape)} and {alpha.shape[0]} alphas"
        )
    expert_agrees = draft_tokens == evidence.argmax_p[:, :gamma]
    if rule is Rule.LOSSY:
        # min(1, 1_a(x) / (1 - alpha)) with 1 - alpha > 0: kept iff x = a; every position is checked.
        deferred = torch.ones_like(expert_agrees)
        accepted = expert_agrees
    elif rule.is_token_specific:
        in_accept_set = token_in_accept_set(rule, evidence.q_drafted, evidence.p_drafted,
                                            evidence.max_p[:, :gamma], alpha)
        deferred = ~in_accept_set  # q = 1_x puts its mass outside A
        accepted = in_accept_set | expert_agrees
    else:
        deferred = confidence_defers(rule, evidence.max_q, evidence.max_p[:, :gamma], alpha)
        accepted = ~deferred | expert_agrees
    num_accepted = accepted.int().cumprod(dim=-1).sum(dim=-1)
    next_token = evidence.argmax_p.gather(-1, num_accepted.view(-1, 1)).squeeze(-1)
    return BatchVerdict(num_accepted, next_token, num_accepted == gamma, deferred)


def verify_block(
    rule: "str | Rule",
    alpha: float,
    draft_tokens: Tensor,  # [gamma] int64
    q: Tensor,  # [gamma, V] drafter distributions (temperature 1) at the drafted positions
    p: Tensor,  # [gamma + 1, V] expert distributions (temperature 1); the last is the bonus position
    sampling: SamplingParams,
    generator: torch.Generator | None = None,
    q_sample: Tensor | None = None,  # [gamma, V] adjust_probs(q, sampling), if already known
    bonus_generator: torch.Generator | None = None,
) -> BlockVerdict:
    """Accept a prefix of the drafted block and produce one more token from the expert side: one
    block of `verify_blocks`.

    With greedy sampling this is deterministic and draws nothing from `generator`.

    `q_sample` lets a caller that only has the drafter's sampling distributions (e.g. sparse
    top-k / top-p rows shipped over the network) pass them directly; `q` is then only used to
    decide deferral (its max for chow/diff, all of it for opt).
    """
    gamma = draft_tokens.shape[0]
    if q.dim() != 2 or p.dim() != 2 or q.shape[0] != gamma or p.shape[0] != gamma + 1 or q.shape[-1] != p.shape[-1]:
        raise ValueError(
            f"verify_block needs q [gamma, V] and p [gamma + 1, V] for gamma={gamma} drafted "
            f"tokens; got q {tuple(q.shape)} and p {tuple(p.shape)}"
        )
    verdict = verify_blocks(
        rule, [alpha], draft_tokens.unsqueeze(0), q.unsqueeze(0), p.unsqueeze(0), sampling,
        None if sampling.is_greedy else [generator if generator is not None else torch.Generator(p.device)],
        None if q_sample is None else q_sample.unsqueeze(0),
        None if sampling.is_greedy or bonus_generator is None else [bonus_generator],
    )
    return BlockVerdict(int(verdict.num_accepted[0]), int(verdict.next_token[0]), bool(verdict.is_bonus[0]),
                        verdict.deferred[0])
