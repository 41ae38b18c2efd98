"""The in-process engine: a drafter/expert pair with a shared tokenizer, streaming generation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .loop import Generators, Participant, rounds_for
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
        if request.messages is not None:
            text = self.tokenizer.apply_chat_template(
                list(request.messages), add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(request.prompt)["input_ids"])

    def generation_limit(self, prompt_tokens: int, request: GenerationRequest) -> int:
        """max_new_tokens, reduced so that a last full round still fits the context window."""
        room = self.context_window - prompt_tokens - request.block_size - 1
        if room < 1:
            raise ValueError(
                f"prompt of {prompt_tokens} tokens is too long: the context window is "
                f"{self.context_window} tokens and a round of block_size={request.block_size} "
                f"needs {request.block_size + 1} more"
            )
        return min(request.max_new_tokens, room)

    def _output_builder(self, limit: int, request: GenerationRequest) -> OutputBuilder:
        return OutputBuilder(self.tokenizer, eos_ids=self.eos_ids, max_new_tokens=limit, stop=request.stop)

    def stream(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        prompt = self.encode(request)
        limit = self.generation_limit(len(prompt), request)
        started = time.perf_counter()
        stats = GenerationStats()
        output = self._output_builder(limit, request)
        probe = self._output_builder(limit, request)  # the sequence cascade's drafter answer
        new_tokens: list[int] = []
        new_sources: list[Source] = []

        def answer_is_complete(answer: list[int]) -> bool:
            return probe.add(answer[-1], Source.DRAFTER)

        drafter = Participant(self.drafter, self.drafter.new_session())
        expert = Participant(self.expert, self.expert.new_session())
        rounds = rounds_for(request, drafter, expert, prompt, stats, Generators.from_seed(request.seed),
                            answer_is_complete)
        try:
            for emitted in rounds:
                first_new = len(output.tokens)
                for token, source in emitted:
                    if output.add(token, source):
                        break
                new_tokens, new_sources = output.tokens[first_new:], output.sources[first_new:]
                for source in new_sources:
                    stats.count_output(source)
                if output.finished:
                    break
                yield GenerationChunk(output.take_segments(), new_tokens, new_sources)
        finally:
            rounds.close()
            stats.wall_seconds = time.perf_counter() - started
        result = GenerationResult(
            text=output.text, token_ids=list(output.tokens), sources=list(output.sources),
            finish_reason=output.finish_reason or "length", prompt_tokens=len(prompt),
            seed=request.seed, stats=stats,
        )
        yield GenerationChunk(output.take_segments(), new_tokens, new_sources, result=result)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        for chunk in self.stream(request):
            if chunk.result is not None:
                return chunk.result
        raise RuntimeError("generation stream ended without a result")  # unreachable by construction
