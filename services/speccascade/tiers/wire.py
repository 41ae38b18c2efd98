"""What travels between the router and the tiers, and how small it is.

A drafted block is shipped as token ids plus only the parts of the drafter's distributions q that
verification needs (see `DraftPayload.for_request`):

- every rule, every sampling: the drafted tokens and max q per position (temperature 1), which is
  all chow and diff use to decide and what the router uses to skip the expert (chow);
- sampling with top-k / top-p: the sparse sampling rows adjust_probs(q) on their support;
- pure temperature sampling: the full sampling rows, as float16 (the only lossy encoding; a
  probability below ~6e-8 rounds to 0);
- the opt rule: the full temperature-1 rows as float16, because D_TV(p, q) needs all of q.

Greedy decoding needs no rows at all: the sampling distribution is the one-hot at each drafted
token. The expert side rebuilds dense tensors (`densify`) and hands them to `cascade.verify_block`.
Arrays are numpy so they pickle compactly through Ray.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..cascade import Rule, SamplingParams

TOKEN_DTYPE = np.int32  # vocabularies are far below 2**31
FULL_ROW_DTYPE = np.float16  # halves the bytes of full-vocabulary rows


class SampleRows(str, enum.Enum):
    """How the drafter's sampling distributions travel."""

    NONE = "none"  # greedy: one-hot at the drafted token
    SPARSE = "sparse"  # top-k / top-p: (index, value) pairs of the support
    FULL = "full"  # pure temperature sampling: every probability, float16


@dataclass(frozen=True)
class DraftPayload:
    sample_rows: SampleRows
    full_decision_rows: bool  # the opt rule needs all of q at temperature 1

    @classmethod
    def for_request(cls, rule: Rule, sampling: SamplingParams) -> "DraftPayload":
        if sampling.is_greedy:
            rows = SampleRows.NONE
        elif sampling.top_k or sampling.top_p < 1.0:
            rows = SampleRows.SPARSE
        else:
            rows = SampleRows.FULL
        return cls(rows, full_decision_rows=rule is Rule.OPT)


@dataclass(frozen=True)
class DraftedBlock:
    """The drafter's answer to one draft call."""

    tokens: np.ndarray  # [gamma] int32
    max_q: np.ndarray  # [gamma] float32, temperature-1 max q
    sample_indices: np.ndarray | None = None  # [gamma, k] int32, SPARSE (padded with value 0)
    sample_values: np.ndarray | None = None  # [gamma, k] float32, SPARSE
    sample_full: np.ndarray | None = None  # [gamma, V] float16, FULL
    decision_full: np.ndarray | None = None  # [gamma, V] float16, opt

    @property
    def gamma(self) -> int:
        return int(self.tokens.shape[0])

    def nbytes(self) -> int:
        arrays = (self.tokens, self.max_q, self.sample_indices, self.sample_values, self.sample_full,
                  self.decision_full)
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass(frozen=True)
class VerifyOutcome:
    """The expert's answer to one verify call."""

    num_accepted: int
    next_token: int  # corrected or bonus token
    is_bonus: bool
    num_deferred: int

    NBYTES = 16  # four small integers


def encode_tokens(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=TOKEN_DTYPE)


def summarize_draft(tokens: list[int], q: Tensor, q_sample: Tensor, payload: DraftPayload) -> DraftedBlock:
    """q, q_sample: [gamma, V] temperature-1 and sampling distributions at the drafted positions."""
    sample_indices = sample_values = sample_full = decision_full = None
    if payload.sample_rows is SampleRows.SPARSE:
        support = int((q_sample > 0).sum(dim=-1).max())
        values, indices = q_sample.topk(support, dim=-1)
        sample_indices = indices.to(torch.int32).numpy()
        sample_values = values.float().numpy()
    elif payload.sample_rows is SampleRows.FULL:
        sample_full = q_sample.to(torch.float16).numpy()
    if payload.full_decision_rows:
        decision_full = q.to(torch.float16).numpy()
    return DraftedBlock(
        tokens=encode_tokens(tokens), max_q=q.amax(dim=-1).float().numpy(),
        sample_indices=sample_indices, sample_values=sample_values, sample_full=sample_full,
        decision_full=decision_full,
    )


def densify(block: DraftedBlock, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Rebuild (q for deciding, q for sampling), both [gamma, V] float32, from a drafted block.

    Without full decision rows, q keeps its exact max at the drafted token and spreads the rest
    uniformly: the rules that get here (chow, diff, token, lossless, lossy) read q only through
    max q, or not at all.
    """
    gamma = block.gamma
    tokens = torch.from_numpy(block.tokens.astype(np.int64))
    if block.decision_full is not None:
        q = torch.from_numpy(block.decision_full).float()
        q = q / q.sum(dim=-1, keepdim=True)
    else:
        max_q = torch.from_numpy(block.max_q).float()
        rest = ((1.0 - max_q) / max(vocab_size - 1, 1)).clamp_min(0)
        q = rest.unsqueeze(-1).expand(gamma, vocab_size).clone()
        q.scatter_(-1, tokens.view(-1, 1), max_q.view(-1, 1))
    if block.sample_indices is not None:
        q_sample = torch.zeros(gamma, vocab_size)
        q_sample.scatter_add_(-1, torch.from_numpy(block.sample_indices.astype(np.int64)),
                              torch.from_numpy(block.sample_values))
    elif block.sample_full is not None:
        q_sample = torch.from_numpy(block.sample_full).float()
        q_sample = q_sample / q_sample.sum(dim=-1, keepdim=True)
    else:
        q_sample = torch.zeros(gamma, vocab_size)
        q_sample.scatter_(-1, tokens.view(-1, 1), 1.0)
    return q, q_sample


class Role(str, enum.Enum):
    DRAFT = "draft"
    VERIFY = "verify"


def round_seed(request_seed: int, round_index: int, role: Role) -> int:
    """An independent 63-bit seed per (request, round, role): the same request seed gives the same
    random draws whichever replica answers a call, and a retried call redraws the same numbers."""
    digest = hashlib.blake2b(f"{request_seed}:{round_index}:{role.value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator_for(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
