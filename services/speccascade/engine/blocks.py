"""What a drafter hands an expert, what the expert answers, and how small it is. The same objects
travel in-process and between tiers, so a served request verifies exactly what an in-process one
does.

A drafted block carries token ids plus only the parts of the drafter's distributions q that
verification needs (see `DraftPayload.for_request`):

- every rule, every sampling: the drafted tokens and max q per position (temperature 1), which is
  all chow and diff use to decide and what the loop uses to skip the expert (chow);
- sampling with top-k / top-p: the sparse sampling rows adjust_probs(q) on their support;
- pure temperature sampling: the full sampling rows, as float16 (the only lossy encoding; a
  probability below ~6e-8 rounds to 0);
- the opt rule: the full temperature-1 rows as float16, because D_TV(p, q) needs all of q;
- the sequence-level cascade: q at each drafted token, for the drafter's confidence in its answer.

Greedy decoding needs no rows at all: the sampling distribution is the one-hot at each drafted
token. The expert side rebuilds dense tensors (`densify`) and hands them to `cascade.verify_block`.
Tensors stay on the device that made them until a tier ships them (`DraftedBlock.to("cpu")`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from ..options import Rule, SamplingParams

TOKEN_BYTES = 4  # token ids travel as int32: vocabularies are far below 2**31
SCALAR_BYTES = 8  # gamma, start, seed, alpha, ...: a few scalars per call
FULL_ROW_DTYPE = torch.float16  # halves the bytes of full-vocabulary rows


class SampleRows(str, enum.Enum):
    """How the drafter's sampling distributions travel."""

    NONE = "none"  # greedy: one-hot at the drafted token
    SPARSE = "sparse"  # top-k / top-p: (index, value) pairs of the support
    FULL = "full"  # pure temperature sampling: every probability, float16


@dataclass(frozen=True)
class DraftPayload:
    sample_rows: SampleRows
    full_decision_rows: bool = False  # the opt rule needs all of q at temperature 1
    token_probs: bool = False  # q at each drafted token (sequence-level cascade)

    @classmethod
    def for_request(cls, rule: Rule, sampling: SamplingParams, *, token_probs: bool = False) -> "DraftPayload":
        if sampling.is_greedy:
            rows = SampleRows.NONE
        elif sampling.top_k or sampling.top_p < 1.0:
            rows = SampleRows.SPARSE
        else:
            rows = SampleRows.FULL
        return cls(rows, full_decision_rows=rule is Rule.OPT, token_probs=token_probs)


@dataclass(frozen=True)
class DraftedBlock:
    """The drafter's answer to one draft call."""

    tokens: tuple[int, ...]  # [gamma] drafted token ids
    max_q: Tensor  # [gamma] float32, temperature-1 max q
    token_q: Tensor | None = None  # [gamma] float32, temperature-1 q at each drafted token
    sample_indices: Tensor | None = None  # [gamma, k] int32, SPARSE (padded with value 0)
    sample_values: Tensor | None = None  # [gamma, k] float32, SPARSE
    sample_full: Tensor | None = None  # [gamma, V] float16, FULL
    decision_full: Tensor | None = None  # [gamma, V] float16, opt

    @property
    def gamma(self) -> int:
        return len(self.tokens)

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)}

    def nbytes(self) -> int:
        """Bytes on the wire."""
        return TOKEN_BYTES * self.gamma + sum(t.numel() * t.element_size() for t in self._tensors().values())

    def to(self, device: torch.device | str) -> "DraftedBlock":
        return replace(self, **{name: t.to(device) for name, t in self._tensors().items()})


EMPTY_BLOCK = DraftedBlock(tokens=(), max_q=torch.zeros(0))


@dataclass(frozen=True)
class VerifyOutcome:
    """The expert's answer to one verify call."""

    num_accepted: int
    next_token: int  # corrected or bonus token
    is_bonus: bool
    num_deferred: int

    NBYTES = 16  # four small integers


def summarize_draft(tokens: list[int], q: Tensor, q_sample: Tensor | None, payload: DraftPayload) -> DraftedBlock:
    """q: [gamma, V] temperature-1 distributions at the drafted positions; q_sample: the same after
    temperature / top-k / top-p (None for greedy, whose rows never travel)."""
    sample_indices = sample_values = sample_full = decision_full = token_q = None
    if payload.sample_rows is SampleRows.SPARSE:
        support = int((q_sample > 0).sum(dim=-1).max())
        sample_values, sample_indices = q_sample.topk(support, dim=-1)
        sample_values, sample_indices = sample_values.float(), sample_indices.to(torch.int32)
    elif payload.sample_rows is SampleRows.FULL:
        sample_full = q_sample.to(FULL_ROW_DTYPE)
    if payload.full_decision_rows:
        decision_full = q.to(FULL_ROW_DTYPE)
    if payload.token_probs:
        index = torch.tensor(tokens, device=q.device).view(-1, 1)
        token_q = q.gather(-1, index).squeeze(-1).float()
    return DraftedBlock(
        tokens=tuple(tokens), max_q=q.amax(dim=-1).float(), token_q=token_q,
        sample_indices=sample_indices, sample_values=sample_values, sample_full=sample_full,
        decision_full=decision_full,
    )


def densify(block: DraftedBlock, vocab_size: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Rebuild (q for deciding, q for sampling), both [gamma, V] float32 on `device`.

    Without full decision rows, q keeps its exact max at the drafted token and spreads the rest
    uniformly: the rules that get here (chow, diff, token, lossless, lossy) read q only through
    max q, or not at all.
    """
    block = block.to(device)
    gamma = block.gamma
    tokens = torch.tensor(block.tokens, dtype=torch.long, device=device).view(-1, 1)
    if block.decision_full is not None:
        q = block.decision_full.float()
        q = q / q.sum(dim=-1, keepdim=True)
    else:
        max_q = block.max_q.float()
        rest = ((1.0 - max_q) / max(vocab_size - 1, 1)).clamp_min(0)
        q = rest.unsqueeze(-1).expand(gamma, vocab_size).clone()
        q.scatter_(-1, tokens, max_q.view(-1, 1))
    if block.sample_indices is not None:
        q_sample = torch.zeros(gamma, vocab_size, device=device)
        q_sample.scatter_add_(-1, block.sample_indices.long(), block.sample_values)
    elif block.sample_full is not None:
        q_sample = block.sample_full.float()
        q_sample = q_sample / q_sample.sum(dim=-1, keepdim=True)
    else:
        q_sample = torch.zeros(gamma, vocab_size, device=device)
        q_sample.scatter_(-1, tokens, 1.0)
    return q, q_sample
