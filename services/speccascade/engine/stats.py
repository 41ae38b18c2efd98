"""Per-request counters. Raw counts only; rates are derived where they are shown."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields


class Source(str, enum.Enum):
    """Which model produced an output token."""

    DRAFTER = "drafter"
    EXPERT = "expert"


@dataclass
class GenerationStats:
    rounds: int = 0  # draft-then-verify rounds (or autoregressive steps for the baselines)
    drafted: int = 0  # tokens proposed by the drafter
    accepted: int = 0  # drafted tokens kept (including whole blocks emitted without the expert)
    deferred: int = 0  # drafted positions where the rule deferred to the expert
    corrected: int = 0  # tokens resampled from the residual after a rejection
    bonus: int = 0  # tokens sampled from the expert after a fully accepted block
    skipped_blocks: int = 0  # blocks emitted with no expert pass (chow)
    expert_passes: int = 0
    drafter_passes: int = 0
    tokens_from_drafter: int = 0  # output tokens, by source
    tokens_from_expert: int = 0
    drafter_seconds: float = 0.0
    expert_seconds: float = 0.0
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
