"""One model with a KV cache per sequence.

A `KVSession` caches the keys/values of a token sequence. Every call names the *whole* token
sequence it wants scored; the runner keeps the longest common prefix of what it has cached, drops
the rest (rollback after a rejection is just this), and runs the model only on the new suffix.
So a call is always answerable from scratch, and a warm cache only makes it cheaper.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..cascade import logits_to_probs

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of: bf16, fp32") from None


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class KVSession:
    """The cached state of one sequence in one model."""

    cache: object  # transformers DynamicCache
    tokens: list[int] = field(default_factory=list)  # the tokens whose keys/values are cached
    last_row: Tensor | None = None  # [V] distribution after `tokens`, if known
    last_used: float = field(default_factory=time.monotonic)

    @property
    def cached_length(self) -> int:
        return len(self.tokens)

    def nbytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
        return total


class ModelRunner:
    """Scores token sequences with a causal LM, reusing per-session KV caches."""

    def __init__(self, model, *, name: str):
        self.model = model.eval()
        self.name = name
        self.config = model.config
        self.vocab_size: int = model.config.vocab_size
        self.context_window: int = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 1 << 30
        self.dtype = next(model.parameters()).dtype
        self.forward_calls = 0

    @classmethod
    def load(cls, path: str, *, dtype: str | torch.dtype = "bf16", name: str | None = None) -> "ModelRunner":
        from transformers import AutoModelForCausalLM

        torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        return cls(model, name=name or str(path))

    def new_session(self) -> KVSession:
        from transformers import DynamicCache

        return KVSession(cache=DynamicCache(config=self.config))

    def _crop(self, session: KVSession, keep: int) -> None:
        drop = session.cached_length - keep
        if drop > 0:
            session.cache.crop(-drop)
            del session.tokens[keep:]
            session.last_row = None

    @torch.inference_mode()
    def distributions(self, session: KVSession, tokens: Sequence[int], start: int) -> Tensor:
        """Next-token distributions (temperature 1, float32) for tokens[start], ..., and the token
        after the last one: returns [len(tokens) - start + 1, V].

        Runs the model only on the part of `tokens` that the session has not cached.
        """
        if not 1 <= start <= len(tokens):
            raise ValueError(f"start={start} must be in [1, {len(tokens)}] for {len(tokens)} tokens")
        session.last_used = time.monotonic()
        common = common_prefix_length(session.tokens, tokens)
        rows_wanted = len(tokens) - start + 1
        first_row: Tensor | None = None
        if common == session.cached_length == start and session.last_row is not None:
            # The cache ends exactly where scoring starts: its stored row is the first one.
            first_row = session.last_row
            keep = start
        else:
            keep = min(common, start - 1)
        self._crop(session, keep)
        new_tokens = list(tokens[keep:])
        if not new_tokens:
            return first_row.unsqueeze(0)
        logits_needed = rows_wanted - (1 if first_row is not None else 0)
        input_ids = torch.tensor([new_tokens], dtype=torch.long)
        out = self.model(
            input_ids=input_ids,
            past_key_values=session.cache,
            use_cache=True,
            logits_to_keep=logits_needed,
        )
        self.forward_calls += 1
        rows = logits_to_probs(out.logits[0, -logits_needed:])  # [logits_needed, V]
        session.tokens.extend(new_tokens)
        session.last_row = rows[-1]
        if first_row is not None:
            rows = torch.cat([first_row.unsqueeze(0), rows], dim=0)
        return rows

    def next_distribution(self, session: KVSession, tokens: Sequence[int]) -> Tensor:
        """[V]: the distribution of the token after `tokens`."""
        return self.distributions(session, tokens, len(tokens))[0]
