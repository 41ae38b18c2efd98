"""Turning emitted tokens into streamed text: incremental detokenisation, stop conditions, and
which model each piece of text came from."""

from __future__ import annotations

from dataclasses import dataclass

from .stats import Source

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


@dataclass(frozen=True)
class Segment:
    text: str
    source: Source


class OutputBuilder:
    """Accumulates output tokens and decides when generation is finished.

    Finish reasons: "stop" (EOS token or a stop string), "length" (max_new_tokens reached).
    An EOS token ends the output and is not part of it, unless `ignore_eos`: then it is an output
    token like any other. Text is cut before a stop string; no stop string ends the output before
    `min_tokens` tokens (as in vLLM, a stop string that ends before then is not searched for
    again). EOS needs no such check here: while min_tokens are not reached the tiers never draw it
    (`SamplingParams.suppressed_ids`).
    """

    def __init__(self, tokenizer, *, eos_ids: frozenset[int], max_new_tokens: int, stop: tuple[str, ...] = (),
                 ignore_eos: bool = False, min_tokens: int = 0, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self.ignore_eos = ignore_eos
        self.min_tokens = min_tokens
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.sources: list[Source] = []
        self.finish_reason: str | None = None
        self._segments: list[Segment] = []  # decoded text so far, by source
        self._text_length = 0
        self._emitted = 0  # characters already handed out by take_segments
        self._prefix_offset = 0  # decode window: tokens[prefix:read] are already text
        self._read_offset = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(s.text for s in self._segments)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def add(self, token: int, source: Source) -> bool:
        """Add one token; returns True once the output is finished."""
        if self.finished:
            return True
        if token in self.eos_ids and not self.ignore_eos:
            self.finish_reason = "stop"
            return True
        self.tokens.append(token)
        self.sources.append(source)
        # Decode a short window rather than the whole output: the text of tokens[prefix:] minus
        # the text of tokens[prefix:read] is what the new tokens add, and it is only trusted once
        # it does not end in a partial UTF-8 character.
        before = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        after = self._decode(self.tokens[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
            delta = after[len(before) :]
            self._segments.append(Segment(delta, source))
            self._text_length += len(delta)
            self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
            if self.stop and len(self.tokens) >= self.min_tokens and self._cut_at_stop(len(delta)):
                self.finish_reason = "stop"
                return True
        if len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
            return True
        return False

    def _cut_at_stop(self, delta_length: int) -> bool:
        text = self.text
        window_start = max(0, len(text) - delta_length - max(len(s) for s in self.stop))
        hits = [i for s in self.stop if (i := text.find(s, window_start)) >= 0]
        if not hits:
            return False
        cut = min(hits)
        kept, length = [], 0
        for seg in self._segments:
            if length + len(seg.text) <= cut:
                kept.append(seg)
                length += len(seg.text)
            else:
                if cut > length:
                    kept.append(Segment(seg.text[: cut - length], seg.source))
                break
        self._segments = kept
        self._text_length = cut
        return True

    def _held_back(self) -> int:
        """Characters at the end that might be the start of a stop string, not yet safe to show."""
        if not self.stop or self.finished:
            return 0
        text = self.text
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    longest = max(longest, k)
                    break
        return longest

    def take_segments(self) -> list[Segment]:
        """The text decoded since the last call, split by source."""
        end = self._text_length - self._held_back()
        out: list[Segment] = []
        position = 0
        for seg in self._segments:
            seg_end = position + len(seg.text)
            lo, hi = max(position, self._emitted), min(seg_end, end)
            if hi > lo:
                out.append(Segment(seg.text[lo - position : hi - position], seg.source))
            position = seg_end
        self._emitted = max(self._emitted, end)
        return out
