"""Counting decoding, once. Every round of every method yields one `RoundRecord`; whoever counts
(a request's `GenerationStats`, the router's autoscaling window, the Prometheus metrics) observes
those records, under one vocabulary of names: the fields of `RoundCounts`. Raw counts only;
rates are derived where they are shown."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields


class Source(str, enum.Enum):
    """Which model produced an output token."""

    DRAFTER = "drafter"
    EXPERT = "expert"


@dataclass
class RoundRecord:
    """What one round did. A round is one draft-then-verify block of a speculative cascade, or one
    step of a baseline (one token of expert-only / drafter-only / token-level cascade decoding; the
    drafter's whole answer, or one expert step, of a sequence-level cascade)."""

    emitted: list[tuple[int, Source]] = field(default_factory=list)  # output tokens, in order
    drafted: int = 0  # tokens proposed by the drafter
    accepted: int = 0  # drafted tokens kept (including whole blocks emitted without the expert)
    deferred: int = 0  # drafted positions where the rule deferred to the expert
    corrected: int = 0  # tokens resampled from the residual after a rejection
    bonus: int = 0  # tokens sampled from the expert after a fully accepted (or empty) block
    skipped_blocks: int = 0  # blocks emitted with no expert call
    skippable_rounds: int = 0  # rounds decided from the drafter alone when it is confident (chow, baselines)
    drafter_calls: int = 0  # draft calls (one call drafts `drafted` tokens, one model step each)
    drafter_passes: int = 0  # drafter forward steps
    expert_passes: int = 0  # expert calls, one forward pass each
    drafter_seconds: float = 0.0  # time spent waiting on the drafter
    expert_seconds: float = 0.0  # time spent waiting on the expert
    wire_bytes: int = 0  # payload of the round's calls, both directions (what a remote tier exchanges)
    context_bytes: int = 0  # of wire_bytes: context token ids sent with the calls


# The names every counter of decoding uses: the numeric fields of a round record.
COUNTER_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RoundRecord) if f.name != "emitted")


@dataclass
class RoundCounts:
    """Sums of round records, plus the number of rounds."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    deferred: int = 0
    corrected: int = 0
    bonus: int = 0
    skipped_blocks: int = 0
    skippable_rounds: int = 0
    drafter_calls: int = 0
    drafter_passes: int = 0
    expert_passes: int = 0
    drafter_seconds: float = 0.0
    expert_seconds: float = 0.0
    wire_bytes: int = 0
    context_bytes: int = 0

    def observe(self, record: RoundRecord) -> None:
        self.rounds += 1
        for name in COUNTER_NAMES:
            value = getattr(record, name)
            if value:
                setattr(self, name, getattr(self, name) + value)

    def counts(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(RoundCounts)}


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

    def add(self, other: "GenerationStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


assert set(COUNTER_NAMES) < {f.name for f in fields(RoundCounts)}  # one vocabulary, checked at import
