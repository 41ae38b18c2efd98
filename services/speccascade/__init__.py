"""speccascade: speculative cascades of language models, served.

In-process use::

    import speccascade
    result = speccascade.generate("def fib(n):", rule="token", alpha=0.5, max_new_tokens=64)
    print(result.text, result.stats)
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine.engine import CascadeEngine, GenerationResult


@functools.lru_cache(maxsize=1)
def load_engine(drafter: str | None = None, expert: str | None = None, dtype: str = "auto") -> "CascadeEngine":
    """The engine for a model pair, loaded once and kept for later calls with the same pair."""
    from .engine.engine import CascadeEngine

    return CascadeEngine.load(drafter, expert, dtype=dtype)


def generate(
    prompt: str | None = None,
    *,
    messages: list[dict] | None = None,
    method: str = "cascade",
    rule: str = "token",
    alpha: float = 0.5,
    block_size: int = 5,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: tuple[str, ...] | list[str] = (),
    ignore_eos: bool = False,
    min_tokens: int = 0,
    skip_special_tokens: bool = True,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    dtype: str = "auto",
    drafter: str | None = None,
    expert: str | None = None,
) -> "GenerationResult":
    """Generate with a speculative cascade (or a baseline `method`) on the given model pair
    (default: the packaged Qwen2.5-Coder 0.5B/1.5B pair). `messages` get the chat template.
    `logprobs` / `prompt_logprobs` (k alternatives per token, 0..20): the result's `logprobs` and
    `prompt_logprobs` (see `speccascade.cascade.logprobs` for which distribution they are from)."""
    from .engine.request import GenerationRequest
    from .options import SamplingParams

    request = GenerationRequest(
        prompt=prompt, messages=messages, method=method, rule=rule, alpha=alpha, block_size=block_size,
        max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
        seed=seed, stop=tuple(stop) if not isinstance(stop, str) else (stop,), ignore_eos=ignore_eos,
        min_tokens=min_tokens, skip_special_tokens=skip_special_tokens, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    return load_engine(drafter, expert, dtype).generate(request)


__all__ = ["generate", "load_engine"]
