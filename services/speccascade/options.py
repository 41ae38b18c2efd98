"""What a request chooses from: the decoding methods, the deferral rules with their alpha ranges,
the sampling parameters, and the defaults and limits of a request.

Pure Python, no torch: the configuration, the command line and the protocol front-ends validate
requests with these without loading a model library; the math (`speccascade.cascade`) and the
engine use the same definitions.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TypeVar

Choice = TypeVar("Choice", bound="StrChoice")


class StrChoice(str, enum.Enum):
    """A string enum that parses its members from their values."""

    @classmethod
    def parse(cls: type[Choice], value: "str | Choice") -> Choice:
        """`value` as a member (case and surrounding blanks ignored); a ValueError names the kind
        (the class name), the bad value and the choices."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            valid = ", ".join(member.value for member in cls)
            raise ValueError(f"unknown {cls.__name__.lower()} {value!r}; expected one of: {valid}") from None


class Rule(StrChoice):
    """Deferral rules (the formulas are in `speccascade.cascade.rules`)."""

    LOSSLESS = "lossless"
    CHOW = "chow"
    DIFF = "diff"
    OPT = "opt"
    TOKEN = "token"  # the paper's third token-specific rule (V3); the name predates V1 and V2
    TOKEN_V1 = "token_v1"
    TOKEN_V2 = "token_v2"
    LOSSY = "lossy"

    @property
    def is_token_specific(self) -> bool:
        """The paper's token-specific rules: keep the drafter's mass on a set A of tokens, hand the
        rest to the expert (they differ only in A)."""
        return self in (Rule.TOKEN, Rule.TOKEN_V1, Rule.TOKEN_V2)

    @property
    def needs_expert_to_decide(self) -> bool:
        """Whether the deferral decision needs p. Only chow decides from the drafter alone,
        which is what lets a confident block skip the expert entirely."""
        return self is not Rule.CHOW


class Method(StrChoice):
    """What produces the tokens: a speculative cascade (with a rule) or one of the baselines."""

    CASCADE = "cascade"
    EXPERT_ONLY = "expert"
    DRAFTER_ONLY = "drafter"
    TOKEN_CASCADE = "token-cascade"
    SEQUENCE_CASCADE = "sequence-cascade"


class Pipeline(StrChoice):
    """Whether the drafter drafts the next block while the expert verifies this one (a pre-draft,
    used when the expert keeps the whole block and its bonus token is the drafter's own guess).
    `auto` stops pre-drafting for a session whose pre-drafts rarely hit, and while the drafter
    tier is the bottleneck. The output is the same whichever is chosen."""

    ON = "on"
    OFF = "off"
    AUTO = "auto"


@dataclass(frozen=True)
class AlphaRange:
    low: float
    high: float
    high_inclusive: bool = True
    meaning: str = ""

    def contains(self, alpha: float) -> bool:
        upper_ok = alpha <= self.high if self.high_inclusive else alpha < self.high
        return self.low <= alpha and upper_ok

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}{']' if self.high_inclusive else ')'}"


# chow:  alpha=0 defers unless the drafter is certain, alpha=1 never defers.
# diff:  alpha=-1 always defers (max q < max p + 1), alpha=1 never (max p - 1 <= 0).
# opt:   max p - max q <= D_TV(p, q), so alpha=1 never defers; alpha=0 is diff at 0.
# token: alpha=0 keeps only the expert's argmax set, alpha=1 makes A the whole vocabulary (pi = q);
#   token_v2 the same with an additive lenience; token_v1 at alpha=0 keeps the tokens the drafter
#   rates at least as high as the expert rates its best.
# lossy: alpha=0 is lossless; alpha -> 1 accepts everything (alpha=1 would divide by zero).
ALPHA_RANGES: dict[Rule, AlphaRange] = {
    Rule.LOSSLESS: AlphaRange(0.0, 1.0, meaning="ignored"),
    Rule.CHOW: AlphaRange(0.0, 1.0, meaning="defer iff max q < 1 - alpha"),
    Rule.DIFF: AlphaRange(-1.0, 1.0, meaning="defer iff max q < max p - alpha"),
    Rule.OPT: AlphaRange(0.0, 1.0, meaning="defer iff max q < max p - alpha * D_TV(p, q)"),
    Rule.TOKEN: AlphaRange(0.0, 1.0, meaning="A = {v : p(v) >= (1 - alpha) max p}"),
    Rule.TOKEN_V1: AlphaRange(0.0, 1.0, meaning="A = {v : q(v) >= max p - alpha}"),
    Rule.TOKEN_V2: AlphaRange(0.0, 1.0, meaning="A = {v : p(v) >= max p - alpha}"),
    Rule.LOSSY: AlphaRange(0.0, 1.0, high_inclusive=False, meaning="accept min(1, p/((1-alpha) q))"),
}

# The alpha at which each rule never defers (output = drafter-only where the rule can skip the
# expert) and, where one exists, the alpha at which it always defers (output = lossless).
NEVER_DEFER_ALPHA = {Rule.CHOW: 1.0, Rule.DIFF: 1.0, Rule.OPT: 1.0, Rule.TOKEN: 1.0, Rule.TOKEN_V1: 1.0,
                     Rule.TOKEN_V2: 1.0}
ALWAYS_DEFER_ALPHA = {Rule.LOSSLESS: 0.0, Rule.CHOW: 0.0, Rule.DIFF: -1.0, Rule.LOSSY: 0.0}


def equivalent_cascades(method: Method, rule: Rule, alpha: float) -> tuple[tuple[Rule, float], ...]:
    """The (rule, alpha) speculative cascades whose output distribution a request's output has: the
    guarantees that output carries. A tenant held to some rules may use a method only when one of
    these is a rule (and alpha) it may ask for (`tenancy.tenants.Tenant.check`).

    `rule` and `alpha` are the request's; only the methods that use them read them. For `lossless`
    the alpha is ignored wherever it appears.
    """
    if method is Method.CASCADE:
        return ((rule, alpha),)
    if method is Method.EXPERT_ONLY:
        # The expert's distribution: speculative decoding, and the rules at an alpha where they
        # always defer. Not chow at 0: it keeps a drafter token the drafter is certain of.
        return ((Rule.LOSSLESS, alpha), (Rule.DIFF, ALWAYS_DEFER_ALPHA[Rule.DIFF]),
                (Rule.LOSSY, ALWAYS_DEFER_ALPHA[Rule.LOSSY]))
    if method is Method.DRAFTER_ONLY:
        # Only chow can skip the expert, so only chow at its never-defer alpha is drafter-only;
        # the other rules' lenient ends still emit one expert (bonus) token per round.
        return ((Rule.CHOW, NEVER_DEFER_ALPHA[Rule.CHOW]),)
    if method is Method.TOKEN_CASCADE:
        # Per token the chow test (the drafter's token if max q >= 1 - alpha, else the expert's).
        return ((Rule.CHOW, alpha),)
    # The sequence-level cascade keeps or replaces a whole answer by its mean confidence, which no
    # per-token rule describes: it carries no rule's guarantee.
    return ()


def validate_alpha(rule: "str | Rule", alpha: float) -> float:
    rule = Rule.parse(rule)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or math.isnan(alpha):
        raise ValueError(f"alpha must be a number, got {alpha!r}")
    allowed = ALPHA_RANGES[rule]
    if not allowed.contains(float(alpha)):
        raise ValueError(
            f"alpha={alpha!r} is out of range for rule {rule.value!r}: expected {allowed} "
            f"({allowed.meaning})"
        )
    return float(alpha)


# Larger than any vocabulary in use; a bigger top_k is a mistake rather than "no filtering".
MAX_TOP_K = 1 << 20


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. `temperature == 0` means greedy (argmax) decoding."""

    temperature: float = 0.0
    top_k: int = 0  # 0 disables top-k filtering
    top_p: float = 1.0  # 1.0 disables nucleus filtering
    # Tokens that may not be drawn at sequence positions before `suppressed_until` (the end-of-
    # sequence ids while a request's min_tokens are not yet produced). Both tiers zero them in
    # their distributions at those positions, so every rule decides over the same masked p and q
    # and the cascade stays exact for the masked target, as vLLM masks their logits.
    suppressed_ids: frozenset[int] = frozenset()
    suppressed_until: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in [0, {MAX_TOP_K}] (0 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not math.isfinite(self.top_p):
            raise ValueError(f"top_p must be a finite number, got {self.top_p!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if not isinstance(self.suppressed_ids, frozenset) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.suppressed_ids):
            raise ValueError(f"suppressed_ids must be a frozenset of token ids, got {self.suppressed_ids!r}")
        if isinstance(self.suppressed_until, bool) or not isinstance(self.suppressed_until, int) \
                or self.suppressed_until < 0:
            raise ValueError(f"suppressed_until must be a position >= 0, got {self.suppressed_until!r}")

    def suppresses_at(self, position: int) -> bool:
        """Whether the suppressed ids are masked out of the distribution at `position`."""
        return bool(self.suppressed_ids) and position < self.suppressed_until

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p cut the distributions down to a support."""
        return bool(self.top_k) or self.top_p < 1.0


GREEDY = SamplingParams()

# Acceptance decays geometrically along a block; past a few dozen positions drafting is wasted
# work, so a larger block size is almost certainly a mistake.
MAX_BLOCK_SIZE = 64
DEFAULT_MAX_NEW_TOKENS = 256
MAX_NEW_TOKENS_CAP = 32768
MAX_STOP_STRINGS = 16
# The most alternatives a request's logprobs may list per position (OpenAI's chat cap, 20).
MAX_TOP_LOGPROBS = 20
CHAT_ROLES = ("system", "user", "assistant")

# Defaults: the paper's best rule at a middle alpha.
DEFAULT_RULE = Rule.TOKEN
DEFAULT_ALPHA = 0.5
DEFAULT_BLOCK_SIZE = 5
# In-process decoding runs both models on one device, one after the other, so a pre-draft cannot
# overlap its verify: off unless asked for. Served, the tiers overlap (`CascadePolicy.pipeline`).
DEFAULT_PIPELINE = Pipeline.OFF
