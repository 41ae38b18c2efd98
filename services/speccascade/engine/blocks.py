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
- either kind of float16 row as its non-zero values and their ids wherever that is fewer bytes
  (`full_rows`): a trained model's distribution holds a few hundred probabilities of float16 size
  among Qwen's 151,936 (the rest round to 0), ~2 KB a row instead of ~300 KB, the same rows exactly;
- the sequence-level cascade: q at each drafted token, for the drafter's confidence in its answer;
- a request for logprobs (`DraftPayload.logprobs` = k): log q at each drafted token and q's k most
  likely tokens (`TokenLogprobs`, k + 1 numbers and k ids a position), which are the output's
  logprobs wherever the output distribution is q (a position that does not defer); and, for the
  rules whose target mixes q and p token by token (the token-specific rules, lossy), the full
  temperature-1 rows in float32 (`exact_rows`), the only way the expert can compute that target
  exactly: gamma * V * 4 bytes a block, paid only by requests that ask for logprobs.

Greedy decoding needs no rows at all: the sampling distribution is the one-hot at each drafted
token. The expert side rebuilds dense tensors on its device (`densify`) and hands them to
`cascade.verify_blocks`. A block's arrays are numpy on the host: they leave the drafter's device
once per block, and travel between tiers as plain arrays, never as pickled torch tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

import numpy as np
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
    logprobs: int | None = None  # log q at each drafted token and its top-k (k = this), if asked for
    exact_rows: bool = False  # all of q's temperature-1 rows in float32, for a mixed target's logprobs

    @classmethod
    def for_request(cls, rule: Rule, sampling: SamplingParams, *, token_probs: bool = False,
                    logprobs: int | None = None) -> "DraftPayload":
        if sampling.is_greedy:
            rows = SampleRows.NONE
        elif sampling.filters:
            rows = SampleRows.SPARSE
        else:
            rows = SampleRows.FULL
        # opt reads all of q; token_v1's set A reads q at every token a sampled draft may hold (a
        # greedy draft holds q's argmax, whose q the block's max_q already carries exactly).
        full = rule is Rule.OPT or (rule is Rule.TOKEN_V1 and not sampling.is_greedy)
        # A token-specific target pi(v) = q(v) 1[v in A] + p(v) q(A^c) needs q on all of A (chosen by
        # p, unknown to the drafter) and lossy's output needs all of q too: only whole rows let the
        # expert compute their log pi exactly. The mixture rules' pi is p or q, never a blend.
        rows_for_logprobs = logprobs is not None and (rule.is_token_specific or rule is Rule.LOSSY)
        return cls(rows, full_decision_rows=full, token_probs=token_probs, logprobs=logprobs,
                   exact_rows=rows_for_logprobs)


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at n positions: of the token at each position, and the k most likely tokens
    there (ids and log-probabilities, most likely first). numpy arrays, so they travel between tiers
    like a block's; -inf where a token has no mass (an end-of-sequence id masked by min_tokens)."""

    chosen: np.ndarray  # [n] float32
    top_ids: np.ndarray  # [n, k] int32
    top_values: np.ndarray  # [n, k] float32

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.chosen.nbytes + self.top_ids.nbytes + self.top_values.nbytes)

    def rows(self) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
        """Per position: (log-probability of its token, ((id, log-probability), ...) top k)."""
        chosen, ids, values = self.chosen.tolist(), self.top_ids.tolist(), self.top_values.tolist()
        return [(c, tuple(zip(i, v))) for c, i, v in zip(chosen, ids, values)]

    @classmethod
    def of_block(cls, block: "DraftedBlock") -> "TokenLogprobs":
        """The drafter's own logprobs of the block's tokens (log q, and q's top k)."""
        return cls(block.logprob_chosen, block.logprob_top_ids, block.logprob_top_values)


def logprobs_on_device(log_probs: Tensor, tokens: Tensor, k: int) -> dict[str, Tensor]:
    """`TokenLogprobs`' arrays, still on the device: log_probs [..., V], tokens [...] -> chosen
    [...], top ids and values [..., k]. Only these k + 1 numbers a position leave the device."""
    chosen = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    k = min(k, log_probs.shape[-1])
    values, ids = log_probs.topk(k, dim=-1) if k else (log_probs[..., :0], log_probs[..., :0].long())
    return {"chosen": chosen.float(), "top_ids": ids.to(torch.int32), "top_values": values.float()}


@dataclass(frozen=True)
class DraftedBlock:
    """The drafter's answer to one draft call: token ids and numpy arrays."""

    tokens: tuple[int, ...]  # [gamma] drafted token ids
    max_q: np.ndarray  # [gamma] float32, temperature-1 max q
    token_q: np.ndarray | None = None  # [gamma] float32, temperature-1 q at each drafted token
    sample_indices: np.ndarray | None = None  # [gamma, k] int32, SPARSE (padded with value 0)
    sample_values: np.ndarray | None = None  # [gamma, k] float32, SPARSE
    sample_full: np.ndarray | None = None  # [gamma, V] float16, FULL; or [gamma, k] at sample_full_ids
    sample_full_ids: np.ndarray | None = None  # [gamma, k] int32: where sample_full's values lie (`full_rows`)
    decision_full: np.ndarray | None = None  # [gamma, V] float16, opt; or [gamma, k] at decision_full_ids
    decision_full_ids: np.ndarray | None = None  # [gamma, k] int32
    # Logprobs requests (`DraftPayload.logprobs`): log q at each drafted token, its top k, and for
    # the token-specific and lossy rules the whole temperature-1 rows (float32, exact).
    logprob_chosen: np.ndarray | None = None  # [gamma] float32
    logprob_top_ids: np.ndarray | None = None  # [gamma, k] int32
    logprob_top_values: np.ndarray | None = None  # [gamma, k] float32
    exact_rows: np.ndarray | None = None  # [gamma, V] float32, q at temperature 1

    @property
    def gamma(self) -> int:
        return len(self.tokens)

    def nbytes(self) -> int:
        """Bytes on the wire."""
        return TOKEN_BYTES * self.gamma + sum(a.nbytes for f in fields(self)
                                              if isinstance(a := getattr(self, f.name), np.ndarray))

    def prefix(self, k: int) -> "DraftedBlock":
        """The block's first k tokens, as if only they had been drafted."""
        return DraftedBlock(self.tokens[:k], **{f.name: a[:k] for f in fields(self)
                                                if isinstance(a := getattr(self, f.name), np.ndarray)})

    def after_first(self) -> "DraftedBlock":
        """The block without its first token (a pre-draft's guess at the bonus token)."""
        return DraftedBlock(self.tokens[1:], **{f.name: a[1:] for f in fields(self)
                                                 if isinstance(a := getattr(self, f.name), np.ndarray)})


EMPTY_BLOCK = DraftedBlock(tokens=(), max_q=np.zeros(0, dtype=np.float32))


@dataclass(frozen=True)
class CallReport:
    """What one draft or verify call cost: where its time went, in seconds, and the bytes it
    moved. A tier reports its own share of the time (queued, forward, decide); `wall_s` is the
    whole call as its caller saw it, so what is left of it is the transport: Ray's calls,
    (de)serialisation, routing. In-process calls move no bytes."""

    queued_s: float = 0.0  # waiting in the tier's batcher for a forward pass
    forward_s: float = 0.0  # model passes
    decide_s: float = 0.0  # choosing the drafted tokens, or verifying the block; the transfer to the host
    wall_s: float = 0.0
    wire_bytes: int = 0  # payload both ways
    context_bytes: int = 0  # of wire_bytes: token ids of the context (not the block) sent with the call

    @property
    def transport_s(self) -> float:
        return max(0.0, self.wall_s - self.queued_s - self.forward_s - self.decide_s)


@dataclass(frozen=True)
class VerifyOutcome:
    """The expert's answer to one verify call."""

    num_accepted: int
    next_token: int  # corrected or bonus token
    is_bonus: bool
    num_deferred: int
    # With a request's logprobs: those of the num_accepted + 1 emitted tokens, under each position's
    # output distribution (see `engine.jobs.output_logprobs`); with prompt logprobs, those of the
    # sequence's tokens 1..start-1 under the expert.
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None

    @property
    def nbytes(self) -> int:
        return 16 + sum(part.nbytes for part in (self.logprobs, self.prompt_logprobs) if part is not None)


def summarize_draft(q: Tensor, q_sample: Tensor | None, tokens: Tensor, payload: DraftPayload) -> dict[str, Tensor]:
    """What a block ships, still on the drafter's device (the caller brings every block of a batch
    to the host at once: `block_from_host`). q: [gamma, V] temperature-1 distributions at the
    drafted positions; q_sample: the same after temperature / top-k / top-p (None for greedy,
    whose rows never travel); tokens: [gamma] the drafted ids."""
    out = {"tokens": tokens, "max_q": q.amax(dim=-1).float()}
    if payload.sample_rows is SampleRows.SPARSE:
        # The widest support over the block's rows: a host sync, only for top-k / top-p sampling.
        support = int((q_sample > 0).sum(dim=-1).max())
        values, indices = q_sample.topk(support, dim=-1)
        out["sample_values"], out["sample_indices"] = values.float(), indices.to(torch.int32)
    elif payload.sample_rows is SampleRows.FULL:
        out |= full_rows(q_sample, "sample_full")
    if payload.full_decision_rows:
        out |= full_rows(q, "decision_full")
    if payload.token_probs:
        out["token_q"] = q.gather(-1, tokens.view(-1, 1)).squeeze(-1).float()
    if payload.logprobs is not None:
        # q is the drafter's temperature-1 distribution as the output would draw from it (after
        # min_tokens' mask), so log q is the logprob of every position where the output is q.
        log_q = torch.log(q.float())
        lp = logprobs_on_device(log_q, tokens, payload.logprobs)
        out["logprob_chosen"], out["logprob_top_ids"], out["logprob_top_values"] = \
            lp["chosen"], lp["top_ids"], lp["top_values"]
        if payload.exact_rows:
            out["exact_rows"] = q.float()
    return out


def full_rows(rows: Tensor, name: str) -> dict[str, Tensor]:
    """Probability rows [gamma, V] as they travel, still on the device: as float16 under `name`; or,
    where it is fewer bytes, only their non-zero float16 values under `name` and those values' ids
    under `name + "_ids"` (int32), both [gamma, k], k the most any row holds (a shorter row padded
    with value 0 at id 0). `dense_rows` rebuilds the float16 rows exactly from either. A trained
    model's distribution at temperature 1 rounds to 0 in float16 everywhere but a few hundred ids
    of Qwen's 151,936 (the packaged 0.5B: 340 a row at the median, 10,539 at most): ~2 KB a row
    against ~300 KB, of a round's two ~1.5 MB messages under unfiltered sampling. A near-uniform
    row (a random model's) stays dense, known from each row's least value. Learning k syncs with the
    device (the block's arrays come to the host right after anyway); on this project's 2-core CPU
    the check costs ~0.25 ms a 5-row block of dense rows, the packing ~1.5-2 ms of sparse ones,
    against ~3 ms a round of transport saved."""
    half = rows.to(FULL_ROW_DTYPE)
    gamma, vocab = half.shape
    # A row without a zero (a random model's, near uniform) would take more bytes as ids: dense.
    if gamma == 0 or bool((half.amin(dim=-1) > 0).any()):
        return {name: half}
    flat = (half != 0).reshape(-1).nonzero().squeeze(1)  # row by row, each row's ids in order
    row = flat // vocab
    counts = torch.bincount(row, minlength=gamma)
    width = int(counts.max())
    if width * (TOKEN_BYTES + half.element_size()) >= vocab * half.element_size():
        return {name: half}
    slot = torch.arange(flat.numel(), device=half.device) - (counts.cumsum(0) - counts)[row]
    ids = torch.zeros(gamma, width, dtype=torch.int32, device=half.device)
    values = torch.zeros(gamma, width, dtype=half.dtype, device=half.device)
    ids[row, slot] = (flat - row * vocab).to(torch.int32)
    values[row, slot] = half.reshape(-1)[flat]
    return {name: values, f"{name}_ids": ids}


def dense_rows(values: np.ndarray, ids: np.ndarray | None, vocab_size: int, device: torch.device | str) -> Tensor:
    """Rows shipped as `values` at `ids` ([gamma, k], padded with value 0; the sparse top-k/top-p
    rows, or `full_rows`' float16 ones), or as dense `values` (ids None), as float32 [gamma, V] on
    `device`: exactly the shipped values (padding adds 0 to a value or to 0)."""
    values_on = torch.from_numpy(values).to(device).float()
    if ids is None:
        return values_on
    return torch.zeros(values_on.shape[0], vocab_size, device=device).scatter_add_(
        -1, torch.from_numpy(ids).to(device).long(), values_on)


def block_from_host(arrays: dict[str, Tensor]) -> DraftedBlock:
    """A `DraftedBlock` from `summarize_draft`'s tensors, moved to the host."""
    tokens = arrays.pop("tokens")
    return DraftedBlock(tokens=tuple(tokens.tolist()), **{name: t.numpy() for name, t in arrays.items()})


def densify(block: DraftedBlock, vocab_size: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Rebuild (q for deciding, q for sampling), both [gamma, V] float32 on `device`.

    Without full decision rows, q keeps its exact max at the drafted token and spreads the rest
    uniformly: the rules that get here (chow, diff, token, token_v2, lossless, lossy; token_v1
    when greedy) read q only through max q, or at the drafted token that is its argmax, or not
    at all.
    """
    gamma = block.gamma
    tokens = torch.tensor(block.tokens, dtype=torch.long, device=device).view(-1, 1)
    if block.decision_full is not None:
        q = dense_rows(block.decision_full, block.decision_full_ids, vocab_size, device)
        q = q / q.sum(dim=-1, keepdim=True)
    else:
        max_q = torch.from_numpy(block.max_q).to(device).float()
        rest = ((1.0 - max_q) / max(vocab_size - 1, 1)).clamp_min(0)
        q = rest.unsqueeze(-1).expand(gamma, vocab_size).clone()
        q.scatter_(-1, tokens, max_q.view(-1, 1))
    if block.sample_indices is not None:
        q_sample = dense_rows(block.sample_values, block.sample_indices, vocab_size, device)
    elif block.sample_full is not None:
        q_sample = dense_rows(block.sample_full, block.sample_full_ids, vocab_size, device)
        q_sample = q_sample / q_sample.sum(dim=-1, keepdim=True)
    else:
        q_sample = torch.zeros(gamma, vocab_size, device=device)
        q_sample.scatter_(-1, tokens, 1.0)
    return q, q_sample


def drafted_q(block: DraftedBlock, vocab_size: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """max q and q at each drafted token ([gamma] float32 each) of the q `densify` rebuilds, without
    the [gamma, V] rows where the block carries no full ones: all greedy verification reads of q."""
    tokens = torch.tensor(block.tokens, dtype=torch.long, device=device).view(-1, 1)
    if block.decision_full is not None:
        q, _ = densify(block, vocab_size, device)
        return q.amax(dim=-1), q.gather(-1, tokens).squeeze(-1)
    max_q = torch.from_numpy(block.max_q).to(device).float()
    # densify's q holds max_q at the drafted token and (1 - max_q) / (V - 1) everywhere else.
    rest = ((1.0 - max_q) / max(vocab_size - 1, 1)).clamp_min(0)
    return torch.maximum(max_q, rest) if vocab_size > 1 else max_q, max_q
