"""The timed pieces of `bench backend`: model shapes with random weights, one backend step over a
prepared batch, the CUDA-graph reference step, and timing several of them interleaved rep by rep."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

SHAPES = {  # Qwen2.5 configurations (the weights are random: speed does not depend on them)
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "tiny-drafter": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1000, tie_word_embeddings=True),
    "tiny-expert": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=256, vocab_size=1000, tie_word_embeddings=False),
}
IMPLEMENTATIONS = ("hf", "static", "reference")
WARMUP_STEPS = 3  # untimed steps per shape first (graph capture, allocator, kernel selection)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape_config(shape: str, **settings):
    """The Qwen2 configuration of a shape preset (`SHAPES`) with Qwen2.5's context and rotary base."""
    from transformers import Qwen2Config

    return Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, **settings)


def build_model(spec: str, device: torch.device, dtype: torch.dtype):
    """A shape preset with random weights, or a model source (packaged name, directory, hub id)."""
    if spec in SHAPES:
        from transformers import Qwen2ForCausalLM

        config = shape_config(spec, attn_implementation="sdpa")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            torch.manual_seed(0)
            with torch.device(device):
                return Qwen2ForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
    from ...engine.backends import load_model
    from ...models import resolve_model

    return load_model(resolve_model(spec).path, dtype=dtype, device=device)


def random_tokens(count: int, vocab: int, generator: torch.Generator) -> list[int]:
    return torch.randint(10, vocab - 10, (count,), generator=generator).tolist()


class BackendStep:
    """One backend, `batch` sessions prefilled with `context` tokens; each call scores `tokens` new
    tokens per session after the context (rolling back the previous call's)."""

    def __init__(self, backend, batch: int, context: int, generator: torch.Generator):
        from ...engine.backends import ScoreJob

        self.backend, self.context, self.generator = backend, context, generator
        vocab = backend.vocab_size
        self.bases = [random_tokens(context, vocab, generator) for _ in range(batch)]
        self.sessions = [backend.new_session() for _ in range(batch)]
        backend.score([ScoreJob(s, b, context) for s, b in zip(self.sessions, self.bases)])  # prefill
        self._job = ScoreJob

    def __call__(self, tokens: int) -> None:
        vocab = self.backend.vocab_size
        jobs = [self._job(s, b + random_tokens(tokens, vocab, self.generator), self.context + 1)
                for s, b in zip(self.sessions, self.bases)]
        self.backend.score(jobs)

    def close(self) -> None:
        for session in self.sessions:
            self.backend.release(session)


class ReferenceStep:
    """transformers' modules over transformers' StaticCache, one step captured as a CUDA graph
    (uncaptured on the CPU): the per-step floor without a compiler, for comparison."""

    def __init__(self, model, batch: int, context: int, tokens: int, room: int, generator: torch.Generator):
        from transformers import StaticCache

        from ...engine.backends.base import CacheKwargs

        device = next(model.parameters()).device
        self.device = device
        try:
            cache = StaticCache(config=model.config, max_cache_len=context + room)
        except TypeError:  # older signature
            cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=context + room,
                                device=device, dtype=next(model.parameters()).dtype)
        kwargs = CacheKwargs.of(model)
        vocab = model.config.vocab_size
        prefill = torch.tensor([random_tokens(context, vocab, generator) for _ in range(batch)], device=device)
        positions = torch.arange(context, device=device)
        with torch.inference_mode():
            model(input_ids=prefill, position_ids=positions.expand(batch, -1), use_cache=True, logits_to_keep=1,
                  **kwargs(cache, positions))
        ids = torch.tensor([random_tokens(tokens, vocab, generator) for _ in range(batch)], device=device)
        step_positions = torch.arange(context, context + tokens, device=device)

        def step():
            out = model(input_ids=ids, position_ids=step_positions.expand(batch, -1).contiguous(), use_cache=True,
                        logits_to_keep=tokens, **kwargs(cache, step_positions))
            return torch.softmax(out.logits.float(), dim=-1)

        self._run: Callable[[], object] = step
        if device.type == "cuda":
            with torch.inference_mode():
                side = torch.cuda.Stream(device=device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
            self._run = graph.replay
        self._cache = cache

    def __call__(self, tokens: int) -> None:
        with torch.inference_mode():
            self._run()


def time_interleaved(steps: dict[str, Callable[[], None]], device: torch.device, reps: int) -> dict[str, list[float]]:
    """Milliseconds of each step, rep by rep in turn, after untimed warm-up steps."""
    for name, step in steps.items():
        with stage(f"warm-up of {name}"):
            for _ in range(WARMUP_STEPS):
                step()
            synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            with stage(f"step of {name}"):
                synchronize(device)
                started = time.perf_counter()
                step()
                synchronize(device)
            times[name].append(1e3 * (time.perf_counter() - started))
    return times


@contextmanager
def stage(what: str):
    """Name the work in progress in any error it raises (a device-side assert surfaces at the next
    synchronisation, so every stage ends with one on a GPU)."""
    try:
        yield
    except Exception as error:
        raise RuntimeError(f"{what} failed: {error}") from error


def summarize(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return statistics.median(ordered), at(0.1), at(0.9)
