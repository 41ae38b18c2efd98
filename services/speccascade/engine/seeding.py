"""One seeding scheme for every random draw of a request.

A draw is keyed by (request seed, absolute token position, purpose) and gets a generator of its
own. So the numbers do not depend on who draws them or in which call: in-process or served, a
retry on another replica, a block of gamma drafted tokens or gamma one-token calls all draw the
same. In particular the drafter's token at position n is drawn identically by every method, which
is why chow at its never-defer alpha reproduces drafter-only decoding with the same seed.

The same key gives the same numbers on the same kind of device; CPU and CUDA generators differ.
"""

from __future__ import annotations

import enum
import hashlib

import torch


class Purpose(str, enum.Enum):
    DRAFT = "draft"  # the drafter's token at a position, and the expert's bonus token there (the same uniform)
    VERIFY = "verify"  # a verify call starting at a position: acceptance draws, then a corrected token


def draw_seed(request_seed: int, position: int, purpose: Purpose) -> int:
    """An independent 63-bit seed per (request seed, position, purpose)."""
    digest = hashlib.blake2b(f"{request_seed}:{position}:{purpose.value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_generator(request_seed: int, position: int, purpose: Purpose,
                   device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(draw_seed(request_seed, position, purpose))
