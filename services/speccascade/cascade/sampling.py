"""The sampling transforms applied identically to the drafter's and expert's
distributions (temperature, top-k, top-p), plus drawing a token from a distribution.

Everything works on probabilities over the last dimension (`[..., vocab]`). A probability vector
is turned back into logits with `log`, so `adjust_probs(softmax(z))` equals processing the logits
`z` directly (up to floating-point rounding); this lets the verification math accept plain
temperature-1 distributions and derive the sampling distributions itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import SamplingParams


def one_hot_argmax(probs: Tensor) -> Tensor:
    """[..., V] -> [..., V] one-hot at the argmax (first index on ties)."""
    out = torch.zeros_like(probs)
    out.scatter_(-1, probs.argmax(dim=-1, keepdim=True), 1.0)
    return out


def adjust_probs(probs: Tensor, params: SamplingParams) -> Tensor:
    """Temperature-1 distributions [..., V] -> the distributions tokens are actually drawn from.

    Greedy gives the one-hot argmax. Otherwise: temperature, then top-k, then top-p, renormalised.
    """
    if params.is_greedy:
        return one_hot_argmax(probs)
    probs = probs.float()
    if params.temperature != 1.0:
        # softmax(log p / T) == p^(1/T) / sum, computed in log space so small p do not underflow.
        probs = torch.softmax(torch.log(probs) / params.temperature, dim=-1)
    if params.top_k and params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if params.top_p < 1.0:
        probs = nucleus(probs, params.top_p)
    return probs / probs.sum(dim=-1, keepdim=True)


# The most likely tokens looked at first, fewest first: a peaked row's nucleus (a real model's, at
# the temperatures people sample at) lies within the first few dozen; a flatter one within 1,024.
# topk over a Qwen-sized row costs ~0.28 ms for 64 and ~0.7 ms for 1,024 on a 2-core CPU.
NUCLEUS_CANDIDATES = (64, 1024)


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """probs [..., V] with every token outside the top-p nucleus zeroed (not renormalised).

    A token is kept when the mass strictly before it, in descending order, is below top_p of the
    row's mass: the smallest prefix whose mass reaches top_p, always at least the most likely
    token. Sorting all V (~152k for Qwen) is the cost of top-p, so the most likely tokens are taken
    first (a partial sort, `NUCLEUS_CANDIDATES` of them, then more): when their mass reaches top_p,
    no token past them can be kept and the nucleus is decided among them alone. Only rows whose
    nucleus reaches past the last candidates (nearly flat distributions) are sorted whole."""
    vocab = probs.shape[-1]
    flat = probs.reshape(-1, vocab)
    threshold = top_p * flat.sum(dim=-1, keepdim=True)
    for candidates in NUCLEUS_CANDIDATES:
        values, order = flat.topk(min(candidates, vocab), dim=-1)  # descending
        cumulative = values.cumsum(dim=-1)
        if candidates >= vocab or bool((cumulative[:, -1:] >= threshold).all()):  # every nucleus among them
            break
    else:
        values, order = flat.sort(dim=-1, descending=True)
        cumulative = values.cumsum(dim=-1)
    kept = torch.where((cumulative - values) < threshold, values, torch.zeros_like(values))
    return torch.zeros_like(flat).scatter(-1, order, kept).reshape(probs.shape)


def logits_to_probs(logits: Tensor) -> Tensor:
    """Model logits [..., V] -> temperature-1 probabilities in float32."""
    return torch.softmax(logits.float(), dim=-1)


def sample(probs: Tensor, generator: torch.Generator | None, *, greedy: bool) -> Tensor:
    """Draw one token per row of [..., V] (probabilities, not necessarily normalised); returns
    [...] int64. Greedy takes the argmax.

    By the inverse of each row's cumulative distribution: one uniform u per row from `generator`,
    the token is the first whose cumulative mass (in float64) passes u times the row's mass. A
    token of zero probability adds no mass, so it is never drawn. `torch.multinomial` draws one
    exponential variate per vocabulary entry (its one-sample path: argmax of p / Exp(1)), and on
    the CPU those come one at a time from the generator: 3.2 ms a Qwen-sized row on this project's
    2-core CPU against 0.3-0.6 ms here with tcmalloc (~1.4 ms on glibc, whose fresh 1.2 MB buffers
    fault their pages in), paid at every sampled draft step and residual draw. On the CPU
    an invalid row (NaN, infinite or negative probabilities, or none at all) raises, as
    multinomial's does; on a GPU that check would cost a host sync per draw, and is not made."""
    if greedy:
        return probs.argmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    cumulative = flat.cumsum(dim=-1, dtype=torch.float64)
    totals = cumulative[:, -1:]
    if flat.device.type == "cpu" and not bool(((totals > 0) & totals.isfinite()).all() and (flat >= 0).all()):
        raise ValueError("sample: a row of probabilities holds NaN, inf or a negative value, or has no mass")
    # float32 uniforms are below 1 - 2**-24, so u * total stays below the total in float64: the
    # index found is always a token of the row.
    uniform = torch.rand(flat.shape[0], 1, generator=generator, dtype=torch.float32, device=flat.device)
    drawn = torch.searchsorted(cumulative, uniform.double() * totals, right=True).squeeze(-1)
    return drawn.reshape(probs.shape[:-1])
