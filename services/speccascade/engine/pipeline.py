"""When to draft ahead: the `pipeline` mode of a request, and what `auto` decides for its session.

A pre-draft is the drafter drafting block k + 1 while the expert verifies block k, from the
context extended by all of block k and the drafter's own guess at the expert's bonus token. It is
used when the expert keeps the whole block and its bonus token is the guess (a hit); otherwise it
is dropped, and the work it took is wasted. A hit saves the next round's draft (the round costs
about max(draft, verify) instead of their sum); a miss costs drafter work, which only matters
while the drafter tier has other work to do.

`auto` drafts ahead only where the drafter's passes can run while the expert's do (tiers on
hardware of their own), and there while (a) the session's pre-drafts hit often enough to pay for
the ones wasted: after `MIN_ATTEMPTS` pre-drafts, a hit rate below `MIN_HIT_RATE` stops it, and it
tries again after `REPROBE_ROUNDS` rounds (a text's predictability changes); and (b) the drafter
tier is not the bottleneck: its calls' time waiting in the tier's batcher, smoothed over calls,
must stay below `QUEUE_PRESSURE` of their compute time, or wasted pre-drafts would delay other
sessions.

Where the passes cannot overlap (in-process; tiers that take turns on shared cores), a pre-draft
saves nothing even when it hits: it runs before or after the verify, never beside it, and when it
takes the cores first the verify waits for the whole of it. A miss then costs a whole draft on the
round's critical path (served, the packaged pair on two cores: verifies waited 0.6-0.7 s behind
pre-drafts, BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..options import Pipeline

if TYPE_CHECKING:  # torch-free at run time: `speccascade status` reads the thresholds
    from .blocks import CallReport

MIN_ATTEMPTS = 4  # pre-drafts before auto judges a session's hit rate
MIN_HIT_RATE = 0.2  # a hit saves a whole draft; below this, misses waste more than hits save
REPROBE_ROUNDS = 32  # rounds with pipelining off before auto tries again
QUEUE_PRESSURE = 0.5  # drafter calls queued more than half their compute time: the drafter tier is busy
SMOOTHING = 0.3  # weight of the newest call in the queue-pressure average


@dataclass
class PipelineGovernor:
    """One session's pipelining: whether to draft ahead this round, and why."""

    mode: Pipeline
    overlaps: bool = True  # whether the drafter's passes can run while the expert's do
    attempts: int = 0
    hits: int = 0
    rounds_off: int = 0
    queue_pressure: float = 0.0  # smoothed queued / compute of the session's draft calls

    @property
    def hit_rate(self) -> float:
        return self.hits / self.attempts if self.attempts else 0.0

    def wants_predraft(self) -> bool:
        return self.reason() in ("on", "auto: on")

    def reason(self) -> str:
        """What the mode decides now: "on" / "off", or auto's choice and why."""
        if self.mode is not Pipeline.AUTO:
            return self.mode.value
        if not self.overlaps:
            return "auto: off, passes cannot overlap"
        if self.queue_pressure > QUEUE_PRESSURE:
            return "auto: off, drafter tier busy"
        if self.attempts >= MIN_ATTEMPTS and self.hit_rate < MIN_HIT_RATE and self.rounds_off < REPROBE_ROUNDS:
            return "auto: off, hit rate low"
        return "auto: on"

    def observe_round(self, predrafted: bool) -> None:
        """A round passed; with pipelining off for a low hit rate, count towards the next try."""
        if not predrafted and self.reason() == "auto: off, hit rate low":
            self.rounds_off += 1
            if self.rounds_off >= REPROBE_ROUNDS:  # try again from scratch
                self.attempts = self.hits = self.rounds_off = 0

    def observe_predraft(self, hit: bool) -> None:
        self.attempts += 1
        self.hits += hit

    def observe_draft_call(self, report: "CallReport") -> None:
        compute = report.forward_s + report.decide_s
        if compute > 0:
            self.queue_pressure += SMOOTHING * (report.queued_s / compute - self.queue_pressure)
