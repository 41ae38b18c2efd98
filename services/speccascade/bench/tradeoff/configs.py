"""The configurations the trade-off benchmark measures: every method and baseline, each over a sweep
of its alpha, under greedy decoding and one sampling setting.

A configuration's `key` names everything that changes its output, so records from earlier runs
with the same key can be reused (resumability) and records with other settings are never mixed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-heavy; imported where requests are built
    from ...engine.request import GenerationRequest
    from ...options import SamplingParams

# Sampling settings (SamplingParams arguments): greedy, and the one sampling setting.
SAMPLINGS: dict[str, dict[str, float]] = {
    "greedy": {"temperature": 0.0},
    "t0.7-p0.95": {"temperature": 0.7, "top_p": 0.95},
}

# Curve names, in the order they are run (so a partial run has the reference points first).
EXPERT = "expert"
DRAFTER = "drafter"
LOSSLESS = "lossless"
HF_ASSISTED = "hf-assisted"  # transformers' assisted generation, the baseline users reach for
METHODS = (EXPERT, LOSSLESS, "token", HF_ASSISTED, DRAFTER, "chow", "diff", "opt", "lossy",
           "token-cascade", "sequence-cascade", "token_v1", "token_v2")

# alpha sweeps, lenient end last. Every rule's alpha: larger = fewer deferrals (rules.py).
FULL_ALPHAS: dict[str, tuple[float, ...]] = {
    "token": (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
    # V1 and V2 are additive in probability (max p - alpha), so their useful alphas are smaller.
    "token_v1": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7),
    "token_v2": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7),
    "chow": (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
    "diff": (-0.1, 0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
    "opt": (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
    "lossy": (0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
    "token-cascade": (0.05, 0.1, 0.2, 0.3, 0.5, 0.7),
    # Deferral iff the drafter's geometric-mean token probability < 1 - alpha; on code it is
    # mostly 0.8..0.95, so the interesting thresholds are small.
    "sequence-cascade": (0.02, 0.05, 0.1, 0.15, 0.2, 0.3),
}
QUICK_ALPHAS: dict[str, tuple[float, ...]] = {
    "token": (0.1, 0.5),
    "token_v1": (0.1,),
    "token_v2": (0.1,),
    "chow": (0.3,),
    "diff": (0.1,),
    "opt": (0.3,),
    "lossy": (0.3,),
    "token-cascade": (0.3,),
    "sequence-cascade": (0.1,),
}


@dataclass(frozen=True)
class BenchConfig:
    """One point of the trade-off: a method (curve), its alpha, a sampling setting."""

    method: str  # a curve name from METHODS
    alpha: float | None  # None for methods without a knob
    sampling: str  # a key of SAMPLINGS
    block_size: int
    max_new_tokens: int

    @property
    def key(self) -> str:
        alpha = "-" if self.alpha is None else f"{self.alpha:g}"
        return f"{self.method}|a={alpha}|{self.sampling}|g={self.block_size}|max={self.max_new_tokens}"

    @property
    def label(self) -> str:
        return self.method if self.alpha is None else f"{self.method}(α={self.alpha:g})"

    @property
    def sampling_params(self) -> "SamplingParams":
        from ...options import SamplingParams

        return SamplingParams(**SAMPLINGS[self.sampling])

    @property
    def uses_engine(self) -> bool:
        return self.method != HF_ASSISTED

    def request(self, prompt: str, *, seed: int, stop: tuple[str, ...]) -> "GenerationRequest":
        """The engine request for this configuration (not for hf-assisted)."""
        from ...engine.request import GenerationRequest
        from ...options import Method, Rule

        common = dict(prompt=prompt, block_size=self.block_size, max_new_tokens=self.max_new_tokens,
                      sampling=self.sampling_params, seed=seed, stop=stop)
        if self.method == EXPERT:
            return GenerationRequest(method=Method.EXPERT_ONLY, **common)
        if self.method == DRAFTER:
            return GenerationRequest(method=Method.DRAFTER_ONLY, **common)
        if self.method == LOSSLESS:
            return GenerationRequest(method=Method.CASCADE, rule=Rule.LOSSLESS, **common)
        if self.method in ("token-cascade", "sequence-cascade"):
            return GenerationRequest(method=Method.parse(self.method), alpha=self.alpha, **common)
        if self.method == HF_ASSISTED:
            raise ValueError("hf-assisted runs through transformers, not the engine")
        return GenerationRequest(method=Method.CASCADE, rule=Rule.parse(self.method), alpha=self.alpha, **common)


def parse_list(text: str, valid: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown {what} {name!r}; expected some of: {', '.join(valid)}")
    if not names:
        raise ValueError(f"no {what} given; expected some of: {', '.join(valid)}")
    return names


def parse_alpha_overrides(items: list[str] | None) -> dict[str, tuple[float, ...]]:
    """`["token=0.1,0.3", "chow=0.5"]` -> {"token": (0.1, 0.3), "chow": (0.5,)}."""
    overrides: dict[str, tuple[float, ...]] = {}
    for item in items or []:
        method, sep, values = item.partition("=")
        method = method.strip()
        if not sep or method not in FULL_ALPHAS:
            raise ValueError(f"--alphas {item!r}: expected METHOD=A[,B...] with METHOD one of "
                             f"{', '.join(FULL_ALPHAS)}")
        try:
            overrides[method] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--alphas {item!r}: alphas must be numbers") from None
        if not overrides[method]:
            raise ValueError(f"--alphas {item!r}: no alpha given")
    return overrides


def build_configs(*, methods: tuple[str, ...] = METHODS, samplings: tuple[str, ...] = tuple(SAMPLINGS),
                  quick: bool = False, block_size: int, max_new_tokens: int,
                  alphas: dict[str, tuple[float, ...]] | None = None) -> list[BenchConfig]:
    """Every configuration, grouped by sampling setting, methods in METHODS order; `alphas`
    replaces the sweep of the methods it names.

    Each configuration is validated by building its engine request once, so a bad alpha fails
    before any model work."""
    alphas = {**(QUICK_ALPHAS if quick else FULL_ALPHAS), **(alphas or {})}
    configs = []
    for sampling in samplings:
        for method in (m for m in METHODS if m in methods):
            for alpha in alphas.get(method, (None,)):
                config = BenchConfig(method, alpha, sampling, block_size, max_new_tokens)
                if config.uses_engine:
                    config.request("x", seed=0, stop=())
                configs.append(config)
    return configs
