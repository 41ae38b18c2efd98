"""The in-process engine: a drafter/expert pair of model backends with a shared tokenizer, driving
the same decoding loop as the served router, with local roles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence

from ..models import PairInfo, eos_token_ids
from .backends import ModelBackend, load_backend
from .generation import GenerationChunk, GenerationResult, StreamAssembler, TextGeneration
from .request import GenerationRequest
from .roles import LocalDrafter, LocalExpert

__all__ = ["CascadeEngine", "GenerationChunk", "GenerationResult", "StreamAssembler"]

# In-process decoding holds one session per model at a time; a second slot lets a caller interleave
# two streams without either losing its cache. (Tiers size their slots in `TierConfig.static`.)
IN_PROCESS_STATIC_SLOTS = 2


class CascadeEngine(TextGeneration):
    def __init__(self, drafter: ModelBackend, expert: ModelBackend, tokenizer,
                 eos_ids: frozenset[int] | None = None):
        if drafter.vocab_size != expert.vocab_size:
            raise ValueError(
                f"drafter {drafter.name!r} scores {drafter.vocab_size} token ids but expert "
                f"{expert.name!r} scores {expert.vocab_size}: a cascade needs one shared vocabulary"
            )
        if eos_ids is None:
            eos_ids = eos_token_ids(tokenizer, getattr(expert.model, "generation_config", None))
        super().__init__(tokenizer, eos_ids=eos_ids,
                         context_window=min(drafter.context_window, expert.context_window))
        self.drafter = drafter
        self.expert = expert

    @classmethod
    def load(cls, drafter: str | None = None, expert: str | None = None, *, dtype: str = "auto",
             backend: str = "hf", device: str = "auto", progress: bool = True,
             static_slots: int = IN_PROCESS_STATIC_SLOTS) -> "CascadeEngine":
        """Load a pair by source (packaged name, local dir, GGUF file or hub id) onto `device`
        ("auto": CUDA when present), each model behind a `backend` ("hf" or "static"; the static
        backend with `static_slots` sessions cached at once: one per request decoded at once)."""
        from ..models import DRAFTER_DEFAULT, EXPERT_DEFAULT

        pair = PairInfo.load(drafter or DRAFTER_DEFAULT, expert or EXPERT_DEFAULT, progress=progress)
        options = dict(dtype=dtype, device=device, vocab_size=pair.vocab_size)
        if backend == "static":
            options["slots"] = static_slots
        return cls(
            load_backend(backend, pair.drafter_path, name=pair.drafter_name, **options),
            load_backend(backend, pair.expert_path, name=pair.expert_name, **options),
            pair.tokenizer, eos_ids=pair.eos_ids,
        )

    async def astream(self, request: GenerationRequest, delivered: Sequence[int] = ()
                      ) -> AsyncIterator[GenerationChunk]:
        """Chunks of the response as rounds complete; the last one carries the result.
        `delivered`: continue a stream of `request` (same seed) that delivered these output tokens
        in its first chunks; the chunks are those it would have sent next (`stream_rounds`)."""
        prompt, limit = self.prepare(request)
        drafter, expert = LocalDrafter(self.drafter), LocalExpert(self.expert)
        chunks = self.stream_rounds(request, prompt, limit, drafter, expert, delivered=delivered)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # a consumer that stops early must not leave it to the garbage collector
            drafter.release()
            expert.release()

    def stream(self, request: GenerationRequest, delivered: Sequence[int] = ()) -> Iterator[GenerationChunk]:
        """`astream` for synchronous callers (on an event loop of its own: from async code, use
        `astream`)."""
        chunks = self.astream(request, delivered)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(chunks.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(chunks.aclose())
            loop.close()

    def generate(self, request: GenerationRequest) -> GenerationResult:
        for chunk in self.stream(request):
            if chunk.result is not None:
                return chunk.result
        raise RuntimeError("generation stream ended without a result")  # unreachable by construction
