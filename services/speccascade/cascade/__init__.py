"""The mathematics of speculative cascades: pure torch, no I/O, no Ray, no gRPC.

Vocabulary, for one round of decoding (Narasimhan et al., "Faster Cascades via Speculative
Decoding", ICLR 2025, arXiv 2405.19261):

- **drafted**: the gamma tokens x_1..x_gamma the drafter proposes, x_t ~ q_t.
- **deferred**: a drafted position where the deferral rule hands the decision to the expert
  (r_t = 1); the target there is the expert's p_t (or, for the token rule, a target that moves some
  of q's mass to p). A non-deferred position has target q_t and its token is always kept.
- **accepted**: drafted tokens kept by speculative sampling against the target pi_t, accepting x_t
  with probability min(1, pi_t(x_t) / q_t(x_t)) until the first rejection.
- **corrected**: at the first rejected position j, the token drawn instead from
  norm(max(0, pi_j - q_j)); the round ends there.
- **bonus**: when all gamma drafted tokens are accepted, one more token drawn from the expert's
  p_{gamma+1}, which the same expert pass computed for free.

One round emits accepted + 1 tokens (the corrected or bonus token), except that with the `chow`
rule a block where no position defers is emitted as drafted without any expert pass.
"""

from ..options import (
    ALPHA_RANGES,
    ALWAYS_DEFER_ALPHA,
    GREEDY,
    NEVER_DEFER_ALPHA,
    Rule,
    SamplingParams,
    validate_alpha,
)
from .baselines import sequence_cascade_defers, sequence_confidence, token_cascade_defers
from .rules import defers, target_distribution, total_variation
from .sampling import adjust_probs, logits_to_probs, sample
from .verify import BatchVerdict, BlockVerdict, GreedyEvidence, verify_block, verify_blocks, verify_greedy_blocks

__all__ = [
    "ALPHA_RANGES",
    "ALWAYS_DEFER_ALPHA",
    "NEVER_DEFER_ALPHA",
    "GREEDY",
    "BatchVerdict",
    "BlockVerdict",
    "GreedyEvidence",
    "Rule",
    "SamplingParams",
    "adjust_probs",
    "defers",
    "logits_to_probs",
    "sample",
    "sequence_cascade_defers",
    "sequence_confidence",
    "target_distribution",
    "token_cascade_defers",
    "total_variation",
    "validate_alpha",
    "verify_block",
    "verify_blocks",
    "verify_greedy_blocks",
]
