"""From a request to streamed text over the decoding loop: shared by the in-process engine and the
served router, which differ only in the roles they hand it (local backends, or remote tiers).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from .loop import prompt_scoring_round, rounds_for
from .prompt import encode_prompt, generation_limit
from .request import GenerationRequest
from .roles import DrafterRole, ExpertRole
from .stats import GenerationStats, RoundRecord, Source, TokenLogprob
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
    # With the request's logprobs: one per token of token_ids (None after a resumed stream, whose
    # delivered tokens' logprobs went with its earlier chunks); with prompt logprobs: one per
    # prompt token, the first None.
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_token_ids: list[int] | None = None  # with prompt_logprobs: the tokens they are of


@dataclass(frozen=True)
class GenerationChunk:
    """New output since the previous chunk. The last chunk of a stream carries `result`."""

    segments: list[Segment]
    token_ids: list[int]
    sources: list[Source]
    result: GenerationResult | None = field(default=None)
    logprobs: list[TokenLogprob] | None = None  # per token of token_ids, if the request asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on a stream's first chunk, if asked
    prompt_token_ids: list[int] | None = None  # with prompt_logprobs: the tokens they are of

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


class StreamAssembler:
    """Feeds rounds of emitted (token, source) pairs into an OutputBuilder, counts output tokens
    by source, and turns what each round added into a chunk; the last chunk carries the result."""

    def __init__(self, output: OutputBuilder, stats: GenerationStats, *, logprobs: bool = False):
        self.output = output
        self.stats = stats
        self._new_tokens: list[int] = []
        self._new_sources: list[Source] = []
        # Logprobs, when asked for: all of the output's (None once unknown: a resumed stream), the
        # last round's, and the prompt's until a chunk has carried them.
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self._want_logprobs = logprobs
        self._new_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.prompt_token_ids: list[int] | None = None
        self._prompt_logprobs_sent = False

    def absorb(self, emitted: list[tuple[int, Source]], logprobs: Sequence[TokenLogprob] = ()) -> bool:
        """Add one round's tokens (and, if asked for, their logprobs, one per emitted token);
        returns True once the output is finished."""
        first_new = len(self.output.tokens)
        for token, source in emitted:
            if self.output.add(token, source):
                break
        self._new_tokens = self.output.tokens[first_new:]
        self._new_sources = self.output.sources[first_new:]
        for source in self._new_sources:
            self.stats.count_output(source)
        if self._want_logprobs:
            # The tokens the output took are a prefix of the round's (an EOS that ends it, and any
            # after it, are not output), so their logprobs are the same prefix.
            self._new_logprobs = list(logprobs[: len(self._new_tokens)])
            if self.logprobs is not None:
                self.logprobs += self._new_logprobs
        return self.output.finished

    def _logprob_fields(self) -> dict:
        fields_: dict = {}
        if self._want_logprobs:
            fields_["logprobs"], self._new_logprobs = self._new_logprobs, []
        if self.prompt_logprobs is not None and not self._prompt_logprobs_sent:
            fields_["prompt_logprobs"], self._prompt_logprobs_sent = self.prompt_logprobs, True
            fields_["prompt_token_ids"] = self.prompt_token_ids
        return fields_

    def resume(self, delivered: Sequence[int]) -> bool:
        """Take in the output a broken-off stream delivered, as its chunks did (its text too, which
        those chunks sent); returns True if that output is already finished. Their sources are not
        known here: the result lists them as the expert's."""
        for token in delivered:
            if self.output.add(token, Source.EXPERT):
                break
        self.output.take_segments()
        self._new_tokens, self._new_sources = [], []
        self.logprobs = None  # the delivered tokens' went with the earlier chunks
        return self.output.finished

    def chunk(self) -> GenerationChunk:
        return GenerationChunk(self.output.take_segments(), self._new_tokens, self._new_sources,
                               **self._logprob_fields())

    def final_chunk(self, *, prompt_tokens: int, seed: int) -> GenerationChunk:
        result = GenerationResult(
            text=self.output.text, token_ids=list(self.output.tokens), sources=list(self.output.sources),
            finish_reason=self.output.finish_reason or "length", prompt_tokens=prompt_tokens, seed=seed,
            stats=self.stats, logprobs=None if self.logprobs is None else list(self.logprobs),
            prompt_logprobs=self.prompt_logprobs, prompt_token_ids=self.prompt_token_ids,
        )
        return GenerationChunk(self.output.take_segments(), self._new_tokens, self._new_sources, result=result,
                               **self._logprob_fields())


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
                            expert: ExpertRole, observers: Iterable[Observer] = (),
                            delivered: Sequence[int] = ()) -> AsyncIterator[GenerationChunk]:
        """Decode `request` with the roles; each round record goes to the request's stats and to
        every observer. The last chunk carries the result.

        `delivered`: a stream of this request (same seed) that broke off after delivering these
        output tokens, all of its chunks up to one (a round boundary). Decoding goes on after them
        and the chunks are those the unbroken stream would have sent next, text included (the
        result covers the whole output; its stats only the rounds decoded here)."""
        started = time.perf_counter()
        request = self.with_eos_suppressed(request, len(prompt))
        stats = GenerationStats()
        observers = (stats.observe, *observers)
        probe = self._output_builder(limit, request)  # the sequence cascade's drafter answer

        def answer_is_complete(answer: list[int]) -> bool:
            return probe.add(answer[-1], Source.DRAFTER)

        assembler = StreamAssembler(self._output_builder(limit, request), stats,
                                    logprobs=request.logprobs is not None)
        if request.prompt_logprobs is not None and not delivered:
            # One expert pass over the prompt, before decoding (a resumed stream sent them already).
            record, scored = await prompt_scoring_round(expert, prompt, request)
            for observe in observers:
                observe(record)
            assembler.prompt_logprobs = [None, *scored.rows()] if prompt else []
            assembler.prompt_token_ids = list(prompt)
            if not request.max_new_tokens:  # the prompt's logprobs were all that was asked for
                stats.wall_seconds = time.perf_counter() - started
                yield assembler.final_chunk(prompt_tokens=len(prompt), seed=request.seed)
                return
        if delivered and assembler.resume(delivered):  # the output was complete: only its end is left
            stats.wall_seconds = time.perf_counter() - started
            yield assembler.final_chunk(prompt_tokens=len(prompt), seed=request.seed)
            return
        rounds = rounds_for(request, drafter, expert, prompt + list(delivered), answer_is_complete,
                            limit - len(delivered), resumed=bool(delivered))
        try:
            async for record in rounds:
                for observe in observers:
                    observe(record)
                if assembler.absorb(record.emitted, record.logprobs):
                    break
                yield assembler.chunk()
        finally:
            await rounds.aclose()
            stats.wall_seconds = time.perf_counter() - started
        yield assembler.final_chunk(prompt_tokens=len(prompt), seed=request.seed)
