"""The tiers' continuous batcher, with stand-in work: batches form from what queued, long
contexts are prefilled one chunk at a time between batches, and dead calls never run."""

from __future__ import annotations

import asyncio
import threading

import pytest
from speccascade.serving.batching import ContinuousBatcher, Prefill
from speccascade.tenancy.fairness import Share


class Model:
    """Stand-in work that records what ran, in order; `gate` holds the next pass until set."""

    def __init__(self, chunks_per_prompt: int = 3):
        self.log: list = []
        self.chunks_left: dict[str, int] = {}
        self.chunks_per_prompt = chunks_per_prompt
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run_batch(self, batch):
        self.entered.set()
        self.gate.wait(timeout=30)
        self.log.append(("batch", sorted(q.item for q in batch)))
        return [q.item.upper() for q in batch]

    def pending(self, item: str) -> int:
        return 100 if item.startswith("long") else 1

    def run_chunk(self, item: str) -> bool:
        left = self.chunks_left.setdefault(item, self.chunks_per_prompt) - 1
        self.chunks_left[item] = left
        self.log.append(("chunk", item))
        return left == 0


def batcher(model: Model, ended=lambda item: None, max_batch_size: int = 8) -> ContinuousBatcher:
    return ContinuousBatcher(model.run_batch, max_batch_size=max_batch_size, name="test", ended=ended,
                             prefill=Prefill(model.pending, model.run_chunk, threshold=16))


def test_calls_queued_during_a_pass_form_the_next_batch():
    model = Model()

    async def scenario():
        b = batcher(model)
        model.gate.clear()
        first = asyncio.create_task(b.submit("a"))
        await asyncio.to_thread(model.entered.wait, 10)  # "a" runs alone: nothing waited for company
        rest = [asyncio.create_task(b.submit(x)) for x in ("b", "c", "d")]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = [r for r, _ in await asyncio.gather(first, *rest)]
        assert results == ["A", "B", "C", "D"]

    asyncio.run(scenario())
    assert model.log == [("batch", ["a"]), ("batch", ["b", "c", "d"])]


def test_a_long_context_is_prefilled_a_chunk_at_a_time_between_batches():
    """A running stream's next step waits for at most one chunk of a new prompt."""
    model = Model(chunks_per_prompt=3)

    async def scenario():
        b = batcher(model)
        long = asyncio.create_task(b.submit("long"))
        for step in range(3):  # a stream stepping while the prompt is prefilled
            result, _ = await b.submit(f"s{step}")
            assert result == f"S{step}"
        assert (await long)[0] == "LONG"

    asyncio.run(scenario())
    chunks = [i for i, entry in enumerate(model.log) if entry[0] == "chunk"]
    assert len(chunks) == 3
    assert all(model.log[i + 1][0] == "batch" for i in chunks[:-1])  # never two chunks in a row while work waits
    assert model.log[-1] == ("batch", ["long"])  # the prompt's own step joins the batches once cached


def test_calls_of_an_ended_session_are_dropped_before_they_run():
    model = Model()
    ended: set[str] = set()

    async def scenario():
        b = batcher(model, ended=lambda item: RuntimeError(f"{item} ended") if item in ended else None)
        model.gate.clear()
        running = asyncio.create_task(b.submit("a"))
        await asyncio.to_thread(model.entered.wait, 10)
        queued = asyncio.create_task(b.submit("b"))
        long = asyncio.create_task(b.submit("long-b"))
        await asyncio.sleep(0.05)
        ended.update({"b", "long-b"})
        b.wake()
        model.gate.set()
        assert (await running)[0] == "A"
        for call in (queued, long):
            with pytest.raises(RuntimeError, match="ended"):
                await call

    asyncio.run(scenario())
    assert model.log == [("batch", ["a"])]  # neither ran, not even a prefill chunk


def test_batches_take_their_turns_by_fair_share():
    model = Model()

    async def scenario():
        b = batcher(model, max_batch_size=2)
        model.gate.clear()
        first = asyncio.create_task(b.submit("a0", Share("flood")))
        await asyncio.to_thread(model.entered.wait, 10)
        flood = [asyncio.create_task(b.submit(f"f{i}", Share("flood"))) for i in range(4)]
        await asyncio.sleep(0.02)
        quiet = asyncio.create_task(b.submit("q", Share("quiet")))
        await asyncio.sleep(0.02)
        model.gate.set()
        await asyncio.gather(first, quiet, *flood)

    asyncio.run(scenario())
    assert "q" in model.log[1][1]  # the quiet tenant's call is in the very next batch
