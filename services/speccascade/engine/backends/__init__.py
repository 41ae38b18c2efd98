"""Model execution behind one interface (`ModelBackend`): new session, score a batch of
(session, tokens, start) jobs into distributions, session memory, vocabulary, context window,
device. The engine and the tiers pick a backend by name from their configuration.

- `hf`: transformers' model call over a DynamicCache per session (simple, exact, the reference).
- `static`: preallocated per-slot K/V buffers written by position, CUDA graphs on GPUs.
"""

from __future__ import annotations

from ...config.app import BACKEND_KINDS, BackendKind
from .base import (
    UNSETTLED,
    BackendSession,
    ModelBackend,
    ScoreJob,
    common_prefix_length,
    parse_dtype,
    resolve_device,
)


def backend_class(kind: str) -> type[ModelBackend]:
    if kind == "hf":
        from .hf import HFBackend

        return HFBackend
    if kind == "static":
        from .static import StaticBackend

        return StaticBackend
    raise ValueError(f"unknown backend {kind!r}; expected one of: {', '.join(BACKEND_KINDS)}")


def load_model(path: str, *, dtype="auto", device="auto"):
    """A causal LM from a local directory or hub id, on `device` ("auto": CUDA when present). With
    several visible GPUs and device "auto", the model is placed across them (accelerate)."""
    import torch
    from transformers import AutoModelForCausalLM

    target = resolve_device(device)
    torch_dtype = parse_dtype(dtype, target)
    if target.type == "cuda" and str(device).strip().lower() == "auto" and torch.cuda.device_count() > 1:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map="auto")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(target)


def load_backend(kind: str, path: str, *, dtype="auto", device="auto", name: str | None = None,
                 vocab_size: int | None = None, **options) -> ModelBackend:
    cls = backend_class(kind)  # an unknown kind fails before any loading
    return cls(load_model(path, dtype=dtype, device=device), name=name or str(path), vocab_size=vocab_size,
               **options)


__all__ = [
    "BACKEND_KINDS",
    "UNSETTLED",
    "BackendKind",
    "BackendSession",
    "ModelBackend",
    "ScoreJob",
    "backend_class",
    "common_prefix_length",
    "load_backend",
    "load_model",
    "parse_dtype",
    "resolve_device",
]
