"""From a request to streamed text over the decoding loop: shared by the in-process engine and the
served router, which differ only in the roles they hand it (local backends, or remote tiers).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace

from .loop import rounds_for
from .prompt import encode_prompt, generation_limit
from .request import GenerationRequest
from .roles import DrafterRole, ExpertRole
from .stats import GenerationStats, RoundRecord, Source
from .text import OutputBuilder, Segment

Observer = Callable[[RoundRecord], None]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    sources: list[Source]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    seed: int
    stats: GenerationStats


@dataclass(frozen=True)
class GenerationChunk:
    """New output since the previous chunk. The last chunk of a stream carries `result`."""

    segments: list[Segment]
    token_ids: list[int]
    sources: list[Source]
    result: GenerationResult | None = field(default=None)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


class StreamAssembler:
    """Feeds rounds of emitted (token, source) pairs into an OutputBuilder, counts output tokens
    by source, and turns what each round added into a chunk; the last chunk carries the result."""

    def __init__(self, output: OutputBuilder, stats: GenerationStats):
        self.output = output
        self.stats = stats
        self._new_tokens: list[int] = []
        self._new_sources: list[Source] = []

    def absorb(self, emitted: list[tuple[int, Source]]) -> bool:
        """Add one round's tokens; returns True once the output is finished."""
        first_new = len(self.output.tokens)
        for token, source in emitted:
            if self.output.add(token, source):
                break
        self._new_tokens = self.output.tokens[first_new:]
        self._new_sources = self.output.sources[first_new:]
        for source in self._new_sources:
            self.stats.count_output(source)
        return self.output.finished

    def chunk(self) -> GenerationChunk:
        return GenerationChunk(self.output.take_segments(), self._new_tokens, self._new_sources)

    def final_chunk(self, *, prompt_tokens: int, seed: int) -> GenerationChunk:
        result = GenerationResult(
            text=self.output.text, token_ids=list(self.output.tokens), sources=list(self.output.sources),
            finish_reason=self.output.finish_reason or "length", prompt_tokens=prompt_tokens, seed=seed,
            stats=self.stats,
        )
        return GenerationChunk(self.output.take_segments(), self._new_tokens, self._new_sources, result=result)


class TextGeneration:
    """Requests in, streamed chunks out, over whatever roles the caller provides."""

    def __init__(self, tokenizer, *, eos_ids: frozenset[int], context_window: int):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context_window = context_window

    def encode(self, request: GenerationRequest) -> list[int]:
        return encode_prompt(self.tokenizer, request)

    def generation_limit(self, prompt_tokens: int, request: GenerationRequest) -> int:
        return generation_limit(self.context_window, prompt_tokens, request)

    def prepare(self, request: GenerationRequest) -> tuple[list[int], int]:
        """Prompt tokens and how many new tokens fit (ValueError names what is wrong)."""
        prompt = self.encode(request)
        return prompt, self.generation_limit(len(prompt), request)

    def _output_builder(self, limit: int, request: GenerationRequest) -> OutputBuilder:
        return OutputBuilder(self.tokenizer, eos_ids=self.eos_ids, max_new_tokens=limit, stop=request.stop,
                             ignore_eos=request.ignore_eos, min_tokens=request.min_tokens,
                             skip_special_tokens=request.skip_special_tokens)

    def with_eos_suppressed(self, request: GenerationRequest, prompt_tokens: int) -> GenerationRequest:
        """The request as the tiers see it: with min_tokens, its sampling masks the EOS ids at the
        positions of the first min_tokens output tokens (in both models' distributions)."""
        if not request.min_tokens or not self.eos_ids:
            return request
        sampling = replace(request.sampling, suppressed_ids=frozenset(self.eos_ids),
                           suppressed_until=prompt_tokens + request.min_tokens)
        return replace(request, sampling=sampling)

    async def stream_rounds(self, request: GenerationRequest, prompt: list[int], limit: int, drafter: DrafterRole,
                            expert: ExpertRole, observers: Iterable[Observer] = ()) -> AsyncIterator[GenerationChunk]:
        """Decode `request` with the roles; each round record goes to the request's stats and to
        every observer. The last chunk carries the result."""
        started = time.perf_counter()
        request = self.with_eos_suppressed(request, len(prompt))
        stats = GenerationStats()
        observers = (stats.observe, *observers)
        probe = self._output_builder(limit, request)  # the sequence cascade's drafter answer

        def answer_is_complete(answer: list[int]) -> bool:
            return probe.add(answer[-1], Source.DRAFTER)

        rounds = rounds_for(request, drafter, expert, prompt, answer_is_complete, limit)
        assembler = StreamAssembler(self._output_builder(limit, request), stats)
        try:
            async for record in rounds:
                for observe in observers:
                    observe(record)
                if assembler.absorb(record.emitted):
                    break
                yield assembler.chunk()
        finally:
            await rounds.aclose()
            stats.wall_seconds = time.perf_counter() - started
        yield assembler.final_chunk(prompt_tokens=len(prompt), seed=request.seed)
