"""The in-process engine: a drafter/expert pair with a shared tokenizer, streaming generation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .loop import Generators, Participant, rounds_for
from .prompt import encode_prompt, generation_limit
from .request import GenerationRequest
from .runner import ModelRunner
from .stats import GenerationStats, Source
from .text import OutputBuilder, Segment, eos_token_ids


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


class CascadeEngine:
    def __init__(self, drafter: ModelRunner, expert: ModelRunner, tokenizer):
        if drafter.vocab_size != expert.vocab_size:
            raise ValueError(
                f"drafter {drafter.name!r} has {drafter.vocab_size} output tokens but expert "
                f"{expert.name!r} has {expert.vocab_size}: a cascade needs one shared vocabulary"
            )
        self.drafter = drafter
        self.expert = expert
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer, getattr(expert.model, "generation_config", None))
        self.context_window = min(drafter.context_window, expert.context_window)

    @classmethod
    def load(cls, drafter: str | None = None, expert: str | None = None, *, dtype: str = "bf16",
             progress: bool = True) -> "CascadeEngine":
        """Load a pair by source (packaged name, local dir, GGUF file or hub id)."""
        from transformers import AutoTokenizer

        from .sources import DRAFTER_DEFAULT, EXPERT_DEFAULT, check_same_tokenizer, resolve_model

        drafter_model = resolve_model(drafter or DRAFTER_DEFAULT, progress=progress)
        expert_model = resolve_model(expert or EXPERT_DEFAULT, progress=progress)
        drafter_tokenizer = AutoTokenizer.from_pretrained(drafter_model.path)
        expert_tokenizer = AutoTokenizer.from_pretrained(expert_model.path)
        check_same_tokenizer(drafter_tokenizer, expert_tokenizer,
                             drafter_name=drafter_model.source, expert_name=expert_model.source)
        return cls(
            ModelRunner.load(drafter_model.path, dtype=dtype, name=drafter_model.source),
            ModelRunner.load(expert_model.path, dtype=dtype, name=expert_model.source),
            expert_tokenizer,
        )

    def encode(self, request: GenerationRequest) -> list[int]:
        return encode_prompt(self.tokenizer, request)

    def generation_limit(self, prompt_tokens: int, request: GenerationRequest) -> int:
        return generation_limit(self.context_window, prompt_tokens, request)

    def _output_builder(self, limit: int, request: GenerationRequest) -> OutputBuilder:
        return OutputBuilder(self.tokenizer, eos_ids=self.eos_ids, max_new_tokens=limit, stop=request.stop)

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        prompt = self.encode(request)
        limit = self.generation_limit(len(prompt), request)
        started = time.perf_counter()
        stats = GenerationStats()
        output = self._output_builder(limit, request)
        probe = self._output_builder(limit, request)  # the sequence cascade's drafter answer

        def answer_is_complete(answer: list[int]) -> bool:
            return probe.add(answer[-1], Source.DRAFTER)

        drafter = Participant(self.drafter, self.drafter.new_session())
        expert = Participant(self.expert, self.expert.new_session())
        rounds = rounds_for(request, drafter, expert, prompt, stats, Generators.from_seed(request.seed),
                            answer_is_complete)
        assembler = StreamAssembler(output, stats)
        try:
            for emitted in rounds:
                if assembler.absorb(emitted):
                    break
                yield assembler.chunk()
        finally:
            rounds.close()
            stats.wall_seconds = time.perf_counter() - started
        yield assembler.final_chunk(prompt_tokens=len(prompt), seed=request.seed)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        for chunk in self.stream(request):
            if chunk.result is not None:
                return chunk.result
        raise RuntimeError("generation stream ended without a result")  # unreachable by construction
