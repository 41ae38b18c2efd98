"""What a tier call carries, both ways, and how a tier keeps a session's tokens between calls.

The router keeps, per session and tier, the sequence it last sent (`SentTokens`); a call carries
only what changed since: the position where the new sequence leaves the old one and the tokens
from there (`TokenDelta`), as an int32 array. The tier keeps each session's sequence
(`KnownTokens`) and applies the delta. Every call has a number (`version`) and names the one it
builds on (`base`): a replica that did not see the base call (the session moved replicas, the
replica evicted or restarted it) answers `needs_context`, and the router sends the whole
sequence instead. So a replica's sequence is always exactly the router's, and the call stays
answerable from scratch, as before, at the cost of one round trip where it is needed.

Blocks travel as numpy arrays (`engine.blocks.DraftedBlock`), outcomes and reports as small
dataclasses: nothing is a pickled torch tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..engine.backends import common_prefix_length
from ..engine.blocks import SCALAR_BYTES, TOKEN_BYTES, CallReport, DraftedBlock, DraftPayload, VerifyOutcome
from ..options import Rule, SamplingParams
from ..tenancy.fairness import DEFAULT_SHARE, Share

TOKEN_DTYPE = np.int32  # token ids: vocabularies are far below 2**31
# The largest message a router or tier replica accepts over gRPC, Serve's channel or the direct one
# (gRPC's default is 4 MiB): a call carrying whole float32 probability rows of a 65-token block over
# a 151,936-token vocabulary is ~40 MB, and vocabularies run to ~256k. Serve reads its bound from the
# replica process's environment at the process's start.
GRPC_MESSAGE_BYTES = 256 * 2**20
GRPC_MESSAGE_ENV = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(GRPC_MESSAGE_BYTES)}


@dataclass(frozen=True)
class Endpoint:
    """A tier replica's direct channel (`direct.py`): its address, and the token every connection
    to it opens with. Named in the replica's answers through Serve."""

    address: str  # host:port
    token: str

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True)
class TokenDelta:
    """A session's sequence, as a change of the one the tier holds after call `base`: keep the
    first `position` tokens, then `tokens`. Call `version` leaves the tier with the result."""

    base: int
    version: int
    position: int
    tokens: np.ndarray  # [n] int32

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes) + 3 * SCALAR_BYTES


@dataclass
class SentTokens:
    """The router's side: what a session's tier holds, as far as the router knows."""

    tokens: list[int] = field(default_factory=list)
    version: int = 0

    def delta(self, sequence: Sequence[int], *, whole: bool = False) -> TokenDelta:
        """The change that leaves the tier holding `sequence` (`whole`: resend all of it)."""
        position = 0 if whole else common_prefix_length(self.tokens, sequence)
        return TokenDelta(self.version, self.version + 1, position, np.asarray(sequence[position:], dtype=TOKEN_DTYPE))

    def sent(self, delta: TokenDelta, sequence: Sequence[int]) -> None:
        """`delta` was sent: the tier holds `sequence` once the call arrives."""
        self.tokens = list(sequence)
        self.version = delta.version


@dataclass
class KnownTokens:
    """The tier's side: a session's sequence, and the call that left it so."""

    tokens: list[int] = field(default_factory=list)
    version: int = 0

    def apply(self, delta: TokenDelta) -> bool:
        """Apply the delta if it builds on this sequence (or is the whole sequence, or was applied
        already: a retried call); False when the router must send the whole sequence."""
        if delta.version == self.version and delta.version > 0:
            return True  # the same call again (retried after an error on the way back)
        if delta.position and (delta.base != self.version or delta.position > len(self.tokens)):
            return False
        self.tokens[delta.position:] = delta.tokens.tolist()
        self.version = delta.version
        return True


@dataclass(frozen=True)
class DraftCall:
    session_id: str
    delta: TokenDelta  # the context the block follows
    gamma: int
    sampling: SamplingParams
    seed: int
    payload: DraftPayload
    share: Share = DEFAULT_SHARE

    @property
    def nbytes(self) -> int:
        return self.delta.nbytes + 3 * SCALAR_BYTES


@dataclass(frozen=True)
class VerifyCall:
    session_id: str
    delta: TokenDelta  # the context and the drafted block
    start: int  # where the block starts
    block: DraftedBlock
    rule: Rule
    alpha: float
    sampling: SamplingParams
    seed: int
    share: Share = DEFAULT_SHARE
    logprobs: int | None = None  # the emitted tokens' logprobs and top k, if asked for
    prompt_logprobs: int | None = None  # the prompt's, under the expert

    @property
    def nbytes(self) -> int:
        return self.delta.nbytes + 4 * SCALAR_BYTES + self.block.nbytes() - TOKEN_BYTES * self.block.gamma


@dataclass(frozen=True)
class DraftReply:
    block: DraftedBlock | None  # None: `needs_context`
    report: CallReport = CallReport()
    endpoint: Endpoint | None = None  # the replica's direct channel, when the application uses it

    @property
    def needs_context(self) -> bool:
        return self.block is None

    @property
    def nbytes(self) -> int:
        return self.block.nbytes() if self.block is not None else SCALAR_BYTES


@dataclass(frozen=True)
class VerifyReply:
    outcome: VerifyOutcome | None  # None: `needs_context`
    report: CallReport = CallReport()
    endpoint: Endpoint | None = None  # the replica's direct channel, when the application uses it

    @property
    def needs_context(self) -> bool:
        return self.outcome is None

    @property
    def nbytes(self) -> int:
        return self.outcome.nbytes if self.outcome is not None else SCALAR_BYTES
