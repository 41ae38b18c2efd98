"""Counting decoding, once. Every round of every method yields one `RoundRecord`; whoever counts
(a request's `GenerationStats`, the router's autoscaling window, the Prometheus metrics) observes
those records, under one vocabulary of names: the fields of `RoundCounts`. Raw counts only;
rates are derived where they are shown."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace

# One output token's log-probability and its position's k most likely tokens, ((id, logprob), ...).
TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]


class Source(str, enum.Enum):
    """Which model produced an output token."""

    DRAFTER = "drafter"
    EXPERT = "expert"


def _counter(help: str, kind: type = int):
    """A counter of decoding; `help` is its description (the Prometheus help text)."""
    return field(default=kind(), metadata={"help": help})


@dataclass
class RoundCounters:
    """What a round counts. Each field is a counter of decoding, named and described once here."""

    drafted: int = _counter("Tokens drafted.")
    accepted: int = _counter("Drafted tokens kept (including blocks emitted without the expert).")
    deferred: int = _counter("Drafted positions deferred to the expert.")
    corrected: int = _counter("Tokens resampled from the residual after a rejection.")
    bonus: int = _counter("Tokens sampled from the expert after a fully accepted (or empty) block.")
    skipped_blocks: int = _counter("Blocks emitted without an expert call.")
    skippable_rounds: int = _counter("Rounds decided from the drafter alone when it is confident (chow and "
                                     "baselines).")
    drafter_calls: int = _counter("Draft calls to the drafter (one call drafts a block, one model step a token).")
    drafter_passes: int = _counter("Drafter forward steps.")
    expert_passes: int = _counter("Expert calls (one forward pass each).")
    drafter_seconds: float = _counter("Seconds spent waiting on draft calls.", float)
    expert_seconds: float = _counter("Seconds spent waiting on expert calls.", float)
    # Where the calls' time went (the tiers report their share with each answer):
    drafter_queue_seconds: float = _counter("Of drafter_seconds: waiting in the drafter's batcher.", float)
    drafter_forward_seconds: float = _counter("Of drafter_seconds: drafter model passes.", float)
    drafter_decide_seconds: float = _counter("Of drafter_seconds: choosing the drafted tokens and bringing the "
                                             "block to the host.", float)
    expert_queue_seconds: float = _counter("Of expert_seconds: waiting in the expert's batcher.", float)
    expert_forward_seconds: float = _counter("Of expert_seconds: expert model passes.", float)
    expert_decide_seconds: float = _counter("Of expert_seconds: verifying the blocks (the rule's math).", float)
    transport_seconds: float = _counter("Of drafter_seconds and expert_seconds: outside the tiers' own work "
                                        "(Ray calls, (de)serialisation, routing).", float)
    predrafts: int = _counter("Blocks drafted ahead, while the expert verified the block before (pipelining), "
                              "counted in the round that uses or drops them.")
    predrafts_used: int = _counter("Of predrafts: used as the next block (the expert kept the whole block, and "
                                   "its bonus token was the drafter's guess).")
    predrafts_wasted: int = _counter("Of predrafts: dropped (a rejection, or another bonus token).")
    predraft_wasted_passes: int = _counter("Drafter forward steps of the dropped pre-drafts (exact for one that had "
                                           "answered; at most for one dropped while running: it stops at its next "
                                           "step, or never starts).")
    wire_bytes: int = _counter("Payload bytes exchanged with the tiers, both directions.")
    context_bytes: int = _counter("Of wire_bytes: context token ids sent with tier calls.")


@dataclass
class RoundRecord(RoundCounters):
    """What one round did. A round is one draft-then-verify block of a speculative cascade, or one
    step of a baseline (one token of expert-only / drafter-only / token-level cascade decoding; the
    drafter's whole answer, or one expert step, of a sequence-level cascade)."""

    emitted: list[tuple[int, Source]] = field(default_factory=list)  # output tokens, in order
    # With a request's logprobs, one per emitted token: (log-probability of the token, its
    # position's top k as ((id, log-probability), ...)), under the distribution it was output from.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    pipeline: str = ""  # pipelining this round: "on", "off", or auto's choice and why (speculative rounds)


# The names every counter of decoding uses: the fields of `RoundCounters`.
COUNTER_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RoundCounters))


@dataclass
class RoundCounts(RoundCounters):
    """Sums of round records, plus the number of rounds."""

    rounds: int = _counter("Decoding rounds (draft-then-verify blocks, baseline steps).")

    def observe(self, record: RoundRecord) -> None:
        self.rounds += 1
        for name in COUNTER_NAMES:
            value = getattr(record, name)
            if value:
                setattr(self, name, getattr(self, name) + value)

    def counts(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(RoundCounts)}


# Attribute access to every counter's name, for code that keys counters by name (autoscaling
# signals, trace records): `COUNTER.drafted == "drafted"`, and a misspelt one fails at import.
COUNTER = SimpleNamespace(**{f.name: f.name for f in fields(RoundCounts)})
COUNTER_HELP: dict[str, str] = {f.name: f.metadata["help"] for f in fields(RoundCounts)}


@dataclass
class GenerationStats(RoundCounts):
    """One request's counts: its rounds, and its output tokens by the model that produced them
    (counted as they enter the output, so tokens past a stop are not)."""

    tokens_from_drafter: int = 0
    tokens_from_expert: int = 0
    wall_seconds: float = 0.0

    @property
    def other_seconds(self) -> float:
        return max(0.0, self.wall_seconds - self.drafter_seconds - self.expert_seconds)

    @property
    def output_tokens(self) -> int:
        return self.tokens_from_drafter + self.tokens_from_expert

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def deferral_rate(self) -> float:
        return self.deferred / self.drafted if self.drafted else 0.0

    def count_output(self, source: Source) -> None:
        if source is Source.DRAFTER:
            self.tokens_from_drafter += 1
        else:
            self.tokens_from_expert += 1

    def as_dict(self) -> dict[str, float]:
        out = asdict(self)
        out["other_seconds"] = self.other_seconds
        return out
