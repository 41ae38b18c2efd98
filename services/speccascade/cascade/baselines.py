"""Decision logic of the classic cascades measured against speculative cascades.

- Token-level cascade: per token, keep the drafter's token if it is confident (max q >= 1 - alpha),
  otherwise ask the expert for that token, sequentially (no block verification).
- Sequence-level cascade: the drafter answers the whole request; if its confidence over the answer
  (geometric-mean token probability) is below 1 - alpha, the expert regenerates from scratch.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..options import Rule
from .rules import mixture_defers


def token_cascade_defers(q: Tensor, alpha: float) -> Tensor:
    """[..., V] -> [...] bool: whether a token-level cascade hands this token to the expert.
    The same confidence test as the chow rule."""
    return mixture_defers(Rule.CHOW, q, None, alpha)


def sequence_confidence(token_logprobs: Tensor) -> float:
    """Geometric-mean probability of the drafter's own tokens, exp(mean log q(x_t)); 1.0 for an
    empty answer."""
    if token_logprobs.numel() == 0:
        return 1.0
    return math.exp(float(token_logprobs.float().mean()))


def sequence_cascade_defers(token_logprobs: Tensor, alpha: float) -> bool:
    """Whether the expert must regenerate the drafter's whole answer."""
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ValueError(f"alpha={alpha!r} is out of range for the sequence-level cascade: expected [0, 1]")
    return sequence_confidence(token_logprobs) < 1.0 - alpha


__all__ = ["token_cascade_defers", "sequence_confidence", "sequence_cascade_defers"]
