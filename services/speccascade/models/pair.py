"""A drafter/expert pair as text sees it (`PairInfo`: the shared tokenizer, end-of-sequence ids,
context window and vocabulary, read without loading weights), and whether two models make a pair
at all: one tokenizer, compared id by id."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .catalog import TokenizerMismatchError

_TOKENIZER_PROBE = "def f(x):\n    return x ** 2  # Grüße, 世界! <tab>\t end"


def check_same_tokenizer(drafter_tokenizer, expert_tokenizer, *, drafter_name: str, expert_name: str) -> None:
    """Raise :class:`TokenizerMismatchError` unless both tokenizers map text to the same ids."""
    problems: list[str] = []
    dv, ev = drafter_tokenizer.get_vocab(), expert_tokenizer.get_vocab()
    if len(dv) != len(ev):
        problems.append(f"vocab size {len(dv)} (drafter) vs {len(ev)} (expert)")
    if dv != ev:
        d_by_id = {i: t for t, i in dv.items()}
        e_by_id = {i: t for t, i in ev.items()}
        for i in sorted(set(d_by_id) | set(e_by_id)):
            a, b = d_by_id.get(i), e_by_id.get(i)
            if a != b:
                problems.append(f"first differing token id {i}: {a!r} (drafter) vs {b!r} (expert)")
                break
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        a, b = getattr(drafter_tokenizer, attr, None), getattr(expert_tokenizer, attr, None)
        if a != b:
            problems.append(f"{attr.removesuffix('_token_id')} token id {a!r} (drafter) vs {b!r} (expert)")
    if not problems:
        a = drafter_tokenizer.encode(_TOKENIZER_PROBE, add_special_tokens=False)
        b = expert_tokenizer.encode(_TOKENIZER_PROBE, add_special_tokens=False)
        if a != b:
            problems.append(f"same vocabulary but a probe text encodes differently: {a[:12]} vs {b[:12]}")
    if problems:
        raise TokenizerMismatchError(
            f"drafter {drafter_name!r} and expert {expert_name!r} do not share a tokenizer: "
            + "; ".join(problems)
            + ". A speculative cascade needs both models to use the same tokenizer; pick a pair from one family."
        )


def eos_token_ids(tokenizer, generation_config=None) -> frozenset[int]:
    ids: set[int] = set()
    for candidate in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, Iterable):
            ids.update(int(c) for c in candidate)
    return frozenset(ids)


@dataclass(frozen=True)
class PairInfo:
    """A drafter/expert pair as text sees it."""

    tokenizer: object
    eos_ids: frozenset[int]
    context_window: int
    vocab_size: int  # ids both models score: the tokenizer's (output rows past them are padding)
    drafter_name: str
    expert_name: str
    drafter_path: str  # local directory (or hub id) from_pretrained loads
    expert_path: str

    @classmethod
    def load(cls, drafter: str, expert: str, *, progress: bool = True) -> "PairInfo":
        """Resolve both sources and read their tokenizers and configs (no weights); a pair whose
        tokenizers differ is refused, naming both."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from .resolve import resolve_model

        drafter_model = resolve_model(drafter, progress=progress)
        expert_model = resolve_model(expert, progress=progress)
        tokenizer = AutoTokenizer.from_pretrained(expert_model.path)
        check_same_tokenizer(AutoTokenizer.from_pretrained(drafter_model.path), tokenizer,
                             drafter_name=drafter_model.source, expert_name=expert_model.source)
        try:
            generation_config = GenerationConfig.from_pretrained(expert_model.path)
        except OSError:
            generation_config = None
        windows = [getattr(AutoConfig.from_pretrained(m.path), "max_position_embeddings", None) or 1 << 30
                   for m in (drafter_model, expert_model)]
        return cls(tokenizer=tokenizer, eos_ids=eos_token_ids(tokenizer, generation_config),
                   context_window=int(min(windows)), vocab_size=len(tokenizer),
                   drafter_name=drafter_model.source, expert_name=expert_model.source,
                   drafter_path=drafter_model.path, expert_path=expert_model.path)
