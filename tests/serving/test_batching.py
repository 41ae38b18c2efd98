"""The tiers' continuous batcher, with stand-in work: batches form from what queued, long
contexts are prefilled one chunk at a time between batches, and dead calls never run."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import traceback

import pytest
from speccascade.serving.batching import GATHER_MAX_S, GATHER_SHARE, ContinuousBatcher, Prefill, SupersededError
from speccascade.tenancy.fairness import Share


class Model:
    """Stand-in work that records what ran, in order; `gate` holds the next pass until set."""

    def __init__(self, chunks_per_prompt: int = 3):
        self.log: list = []
        self.tokens_left: dict[str, int] = {}
        self.chunks_per_prompt = chunks_per_prompt
        self.budgets: list[int] = []  # each prefill pass's budget
        self.shares: list[int] = []  # and the most it gives one prompt
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run_batch(self, batch):
        self.entered.set()
        self.gate.wait(timeout=30)
        self.log.append(("batch", sorted(q.item for q in batch)))
        return [q.item.upper() for q in batch]

    def pending(self, item: str) -> int:
        """A long prompt: its tokens not yet prefilled; other calls: one token."""
        return self.tokens_left.setdefault(item, CHUNK * self.chunks_per_prompt) if item.startswith("long") else 1

    def run(self, items: list[str], budget: int, most: int) -> list[bool]:
        """Feeds the prompts in order, as many tokens as the budget has left, `most` at most each."""
        fed, done = [], []
        self.budgets.append(budget)
        self.shares.append(most)
        for item in items:
            n = min(self.pending(item), budget, most)
            if n:
                budget -= n
                self.tokens_left[item] -= n
                fed.append(item)
            done.append(self.tokens_left[item] == 0)
        self.log.append(("chunk", sorted(fed)))
        return done


CHUNK = 20  # a prompt's tokens per chunk


def batcher(model: Model, ended=lambda item: None, max_batch_size: int = 8, budget: int = CHUNK,
            prompts: int = 1, live=None) -> ContinuousBatcher:
    return ContinuousBatcher(model.run_batch, max_batch_size=max_batch_size, name="test", ended=ended,
                             prefill=Prefill(model.pending, model.run, threshold=16, budget=budget, prompts=prompts,
                                             live=live),
                             session_of=lambda item: item.split(".")[0])  # "b.2": session b's second call


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


def test_a_burst_of_prompts_is_prefilled_several_to_a_pass_within_the_budget():
    """Four new prompts at once, a budget of two prompts a pass: each pass feeds two (not one chunk
    of one prompt per batch), in arrival order, while a stream keeps stepping between passes."""
    model = Model(chunks_per_prompt=1)

    async def scenario():
        b = batcher(model, budget=2 * CHUNK)
        prompts = [asyncio.create_task(b.submit(f"long{i}")) for i in range(4)]
        for step in range(4):
            assert (await b.submit(f"s{step}"))[0] == f"S{step}"
        assert [(await p)[0] for p in prompts] == [f"LONG{i}" for i in range(4)]

    asyncio.run(scenario())
    passes = [fed for kind, fed in model.log if kind == "chunk"]
    assert passes == [["long0", "long1"], ["long2", "long3"]]
    second_pass = model.log.index(("chunk", ["long2", "long3"]))
    assert model.log[second_pass - 1][0] == "batch"  # the stream stepped between the two passes


def test_a_prefill_pass_holds_at_most_max_batch_size_prompts_however_large_its_budget():
    """Short prompts each take less than a chunk, so a budget alone would let one pass hold more
    sessions than a batch may (the static backend has slots for max_batch_size)."""
    model = Model(chunks_per_prompt=1)

    async def scenario():
        b = batcher(model, max_batch_size=2, budget=4 * CHUNK)
        burst = [asyncio.create_task(b.submit(f"long{i}")) for i in range(5)]
        assert [(await p)[0] for p in burst] == [f"LONG{i}" for i in range(5)]

    asyncio.run(scenario())
    passes = [fed for kind, fed in model.log if kind == "chunk"]
    assert passes == [["long0", "long1"], ["long2", "long3"], ["long4"]]


@pytest.mark.parametrize("prompts", [1, 3])
def test_a_pass_feeds_a_chunk_to_each_waiting_prompt_up_to_prefill_pass_prompts(prompts):
    """Four new prompts of two chunks each: with `prompts` 3, a pass feeds a chunk to each of the
    first three (its budget three chunks) until they are cached, then the fourth: four passes for
    eight chunks; with 1, a chunk a pass. A lone prompt's passes stay one chunk either way."""
    model = Model(chunks_per_prompt=2)

    async def scenario():
        b = batcher(model, prompts=prompts)
        burst = [asyncio.create_task(b.submit(f"long{i}")) for i in range(4)]
        assert [(await p)[0] for p in burst] == [f"LONG{i}" for i in range(4)]
        start = len(model.budgets)
        assert (await b.submit("longer"))[0] == "LONGER"
        return model.budgets[start:]

    lone = asyncio.run(scenario())
    passes = [fed for kind, fed in model.log if kind == "chunk"]
    if prompts == 1:
        assert passes[:8] == [[f"long{i}"] for i in range(4) for _ in range(2)]
        assert model.budgets[:8] == [CHUNK] * 8
    else:
        first_three = ["long0", "long1", "long2"]
        assert passes[:4] == [first_three, first_three, ["long3"], ["long3"]]
        assert model.budgets[:4] == [3 * CHUNK, 3 * CHUNK, CHUNK, CHUNK]
    assert lone == [CHUNK, CHUNK]


def test_while_no_stream_decodes_a_pass_budget_is_shared_by_the_prompts_waiting():
    """`live` names the replica's sessions. A lone prompt of four chunks with nothing else live:
    passes of the whole budget (three chunks), so two passes, not four. The same prompt while a
    stream decodes: a chunk a pass, the stream's steps between. Three prompts at once, nothing else
    live: the budget evenly, a chunk each, every prompt cached by the same pass."""
    sessions: set[str] = set()

    def run(model, prompts, stepping=()):
        async def scenario():
            b = batcher(model, prompts=3, live=lambda: sorted(sessions))
            sessions.update(prompts)
            calls = [asyncio.create_task(b.submit(p)) for p in prompts]
            for step in stepping:
                assert (await b.submit(step))[0] == step.upper()
            assert [(await c)[0] for c in calls] == [p.upper() for p in prompts]
            sessions.clear()

        asyncio.run(scenario())
        return [fed for kind, fed in model.log if kind == "chunk"], model.shares

    alone = Model(chunks_per_prompt=4)
    passes, shares = run(alone, ["long"])
    assert passes == [["long"], ["long"]] and shares == [3 * CHUNK, 3 * CHUNK]
    assert alone.budgets == [3 * CHUNK, 3 * CHUNK]

    beside = Model(chunks_per_prompt=4)
    sessions.add("s")  # a decoding stream
    passes, shares = run(beside, ["long"], stepping=[f"s.{i}" for i in range(4)])
    assert passes == [["long"]] * 4 and shares == [CHUNK] * 4
    assert [kind for kind, _ in beside.log[:6]] == ["batch", "chunk"] * 3  # the steps between the chunks

    burst = Model(chunks_per_prompt=2)
    passes, shares = run(burst, ["long0", "long1", "long2"])
    assert passes == [["long0", "long1", "long2"]] * 2 and shares == [CHUNK, CHUNK]


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


def test_a_fault_between_passes_fails_the_calls_held_and_the_worker_goes_on(caplog):
    """A bug in the batcher's own bookkeeping (here `ended` raising as a batch forms) reaches every
    caller it strands, with its error, and is logged; the next calls run as usual."""
    model = Model()
    broken = {"on": False}

    def ended(item):
        if broken["on"]:
            raise KeyError(f"bookkeeping lost {item}")
        return None

    async def scenario():
        b = batcher(model, ended=ended)
        model.gate.clear()
        running = asyncio.create_task(b.submit("a"))
        await asyncio.to_thread(model.entered.wait, 10)
        stranded = [asyncio.create_task(b.submit(x)) for x in ("b", "c", "long-d")]
        await asyncio.sleep(0.05)
        broken["on"] = True
        model.gate.set()
        assert (await running)[0] == "A"
        for call in stranded:
            with pytest.raises(KeyError, match="bookkeeping lost"):
                await asyncio.wait_for(call, 5)
        broken["on"] = False
        assert (await asyncio.wait_for(b.submit("e"), 5))[0] == "E"

    with caplog.at_level("ERROR", logger="speccascade.serving.batching"):
        asyncio.run(scenario())
    assert model.log == [("batch", ["a"]), ("batch", ["e"])]
    assert "test batcher failed between passes; failing the" in caplog.text


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


def test_a_pass_that_returns_too_few_results_fails_its_batch_rather_than_leave_callers_waiting():
    model = Model()
    short = {"on": True}
    run_batch = model.run_batch
    model.run_batch = lambda batch: run_batch(batch)[: -1 if short["on"] else None]

    async def scenario():
        b = batcher(model)
        model.gate.clear()
        first = asyncio.create_task(b.submit("a"))
        await asyncio.to_thread(model.entered.wait, 10)
        pair = [asyncio.create_task(b.submit(x)) for x in ("b", "c")]
        await asyncio.sleep(0.05)
        model.gate.set()
        for call in (first, *pair):
            with pytest.raises(RuntimeError, match="returned 0 results for a batch of 1|returned 1 results for a batch of 2"):
                await asyncio.wait_for(call, 5)
        short["on"] = False
        assert (await asyncio.wait_for(b.submit("d"), 5))[0] == "D"

    asyncio.run(scenario())


class PassError(Exception):
    pass


def test_a_failed_pass_gives_each_caller_its_own_error_whose_traceback_is_its_own():
    """One exception object raised by every caller of a failed batch would gather all their frames in
    one traceback (and mix them); each caller gets a copy with the pass's own traceback under it."""
    model = Model()
    run_batch = model.run_batch

    def failing(batch):
        run_batch(batch)
        raise PassError("out of memory in the pass", len(batch))

    model.run_batch = failing

    async def caller(b, item):
        try:
            await b.submit(item)
        except PassError as error:
            return error

    async def scenario():
        b = batcher(model)
        model.gate.clear()
        first = asyncio.create_task(b.submit("a"))
        await asyncio.to_thread(model.entered.wait, 10)
        callers = [asyncio.create_task(caller(b, x)) for x in ("b", "c", "d")]
        await asyncio.sleep(0.05)
        model.gate.set()
        with pytest.raises(PassError):
            await asyncio.wait_for(first, 5)
        return [await asyncio.wait_for(call, 5) for call in callers]

    errors = asyncio.run(scenario())
    assert len({id(error) for error in errors}) == 3
    assert all(error.args == ("out of memory in the pass", 3) for error in errors)
    frames = [[frame.name for frame in traceback.extract_tb(error.__traceback__)] for error in errors]
    assert frames[0] == frames[1] == frames[2]  # no caller's frames in another's traceback
    assert frames[0].count("caller") == 1 and frames[0][-1] == "failing"  # its own frame, then the pass's


def test_an_error_that_copies_differently_is_shared_and_a_copys_notes_are_its_own():
    """A copy is made by calling the class again with the error's args: an error whose constructor
    builds its message from them would come out garbled (the session-ended error did), so it is
    given as it is; a copy gets a list of notes of its own."""
    from speccascade.serving.batching import _own_copy
    from speccascade.serving.sessions import SessionEndedError

    ended = SessionEndedError("abc")
    assert _own_copy(ended) is ended and str(ended) == str(SessionEndedError("abc"))
    error = ValueError("out of memory")
    error.add_note("in the expert's pass")
    copied = _own_copy(error)
    copied.add_note("seen by caller 2")
    assert copied is not error and str(copied) == str(error)
    assert error.__notes__ == ["in the expert's pass"] and copied.__notes__[-1] == "seen by caller 2"


def test_prompts_of_different_tenants_take_turns_chunk_by_chunk_and_a_tenants_own_keep_their_order():
    """With one chunk a pass, a tenant's long prompt no longer holds the prefill passes until it is
    cached: another tenant's prompt gets every other chunk; the first tenant's second prompt waits
    for its first."""
    model = Model(chunks_per_prompt=3)

    async def scenario():
        b = batcher(model)
        model.gate.clear()
        running = asyncio.create_task(b.submit("s0"))
        await asyncio.to_thread(model.entered.wait, 10)
        prompts = [asyncio.create_task(b.submit(item, Share(tenant)))
                   for item, tenant in (("long-a1", "a"), ("long-a2", "a"), ("long-b", "b"))]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(running, *prompts)

    asyncio.run(scenario())
    fed = [entry[1][0] for entry in model.log if entry[0] == "chunk"]
    assert [item[5] for item in fed[:4]] == ["a", "b", "a", "b"]  # tenant by tenant, a chunk each
    assert fed.index("long-a2") > max(i for i, item in enumerate(fed) if item == "long-a1")
    assert sorted(fed) == ["long-a1"] * 3 + ["long-a2"] * 3 + ["long-b"] * 3


def test_a_cancelled_prompt_never_takes_a_live_prompt_of_its_tenant_out_of_turn():
    """The first tenant's first prompt is cancelled after a chunk: its second prompt takes the first's
    place in line (the turns still alternate with the other tenant), not the cancelled one's later
    place."""
    model = Model(chunks_per_prompt=3)
    fed_b, cancelled = threading.Event(), threading.Event()
    run = model.run

    def run_then_hold(items, budget, most):
        done = run(items, budget, most)
        if items == ["long-b"] and not fed_b.is_set():  # a1 fed once, then b: hold until a1 is cancelled
            fed_b.set()
            cancelled.wait(10)
        return done

    async def scenario():
        b = batcher(model)
        b.prefill = dataclasses.replace(b.prefill, run=run_then_hold)
        model.gate.clear()
        running = asyncio.create_task(b.submit("s0"))
        await asyncio.to_thread(model.entered.wait, 10)
        a1 = asyncio.create_task(b.submit("long-a1", Share("a")))
        rest = [asyncio.create_task(b.submit(item, Share(tenant)))
                for item, tenant in (("long-a2", "a"), ("long-b", "b"))]
        await asyncio.sleep(0.05)
        model.gate.set()
        assert await asyncio.to_thread(fed_b.wait, 10)
        a1.cancel()
        cancelled.set()
        await asyncio.gather(running, *rest)

    asyncio.run(scenario())
    fed = [entry[1][0] for entry in model.log if entry[0] == "chunk"]
    assert fed[:3] == ["long-a1", "long-b", "long-a2"]
    assert [item[5] for item in fed[:6]] == ["a", "b", "a", "b", "a", "b"]


def test_a_newer_call_for_a_session_supersedes_its_queued_one_and_no_batch_holds_a_session_twice():
    """A router's retry after a timeout (or a draft replacing a dropped pre-draft) arrives while the
    first call still queues: the first is dropped, so one cache is never advanced twice in a pass."""
    model = Model()

    async def scenario():
        b = batcher(model)
        model.gate.clear()
        running = asyncio.create_task(b.submit("a.1"))
        await asyncio.to_thread(model.entered.wait, 10)
        first = asyncio.create_task(b.submit("b.1"))  # queued behind the pass in progress
        other = asyncio.create_task(b.submit("c.1"))
        await asyncio.sleep(0.05)
        retry = asyncio.create_task(b.submit("b.2"))  # the same session "b"
        again = asyncio.create_task(b.submit("a.2"))  # session "a", whose call is running
        await asyncio.sleep(0.05)
        model.gate.set()
        with pytest.raises(SupersededError, match="'b'"):
            await first
        with pytest.raises(SupersededError, match="'a'"):
            await running  # it ran, but its caller had been replaced: the newer call's answer counts
        return [(await call)[0] for call in (other, retry, again)]

    assert asyncio.run(scenario()) == ["C.1", "B.2", "A.2"]
    assert model.log == [("batch", ["a.1"]), ("batch", ["a.2", "b.2", "c.1"])]


def test_progress_tells_a_running_pass_and_its_queue_from_a_still_model():
    model = Model()

    async def scenario():
        b = batcher(model)
        await asyncio.sleep(0.2)
        idle = b.progress()  # nothing ran yet: still since the batcher started
        assert (idle.running, idle.queued) == (False, 0) and idle.still_s >= 0.2 and not idle.moving(0.1)
        model.gate.clear()
        first = asyncio.create_task(b.submit("a"))
        await asyncio.to_thread(model.entered.wait, 10)
        queued = [asyncio.create_task(b.submit(x)) for x in ("b", "c")]
        await asyncio.sleep(0.05)
        busy = b.progress()
        assert (busy.running, busy.queued) == (True, 2) and busy.moving(0.2)
        await asyncio.sleep(0.3)  # the same pass, still running: no pass started or ended since
        assert not b.progress().moving(0.2)
        model.gate.set()
        await asyncio.gather(first, *queued)
        done = b.progress()
        assert (done.running, done.queued) == (False, 0) and done.moving(0.2)

    asyncio.run(scenario())


class Turn:
    """A stand-in for the shared cores' turn: `others` holds it until set; records what the batcher
    handed over at each release and whether it holds the turn."""

    def __init__(self, handed: tuple[str, ...] = ()):
        self.others = threading.Event()
        self.others.set()
        self.handed = handed
        self.released: list[list[str]] = []
        self.held = False

    def try_acquire(self):
        if not self.others.is_set():
            return None
        self.held = True
        return self.handed

    def acquire(self):
        self.others.wait(30)
        self.held = True
        return self.handed

    def release(self, handoff=()):
        self.held = False
        self.released.append(sorted(handoff))


def turn_batcher(model: Model, turn: Turn, holds=lambda session: True) -> ContinuousBatcher:
    return ContinuousBatcher(model.run_batch, max_batch_size=8, name="test", turns=turn, holds=holds,
                             session_of=lambda item: item.split(".")[0])


def test_with_turns_the_batch_forms_once_the_turn_is_taken():
    """Calls that arrive while the other tier holds the turn all join the batch that then runs, not
    only the one that was queued when the wait began; the turn goes back naming the sessions it
    answered."""
    model = Model()
    turn = Turn()

    async def scenario():
        b = turn_batcher(model, turn)
        turn.others.clear()
        first = asyncio.create_task(b.submit("a"))
        await asyncio.sleep(0.05)  # "a" waits for the turn
        rest = [asyncio.create_task(b.submit(x)) for x in ("b", "c")]
        await asyncio.sleep(0.05)
        turn.others.set()
        assert [r for r, _ in await asyncio.gather(first, *rest)] == ["A", "B", "C"]
        assert b.gathers == 0  # nothing was handed over

    asyncio.run(scenario())
    assert model.log == [("batch", ["a", "b", "c"])]
    assert turn.released == [["a", "b", "c"]] and not turn.held


def test_a_turn_whose_note_cannot_be_written_leaves_the_worker_serving():
    """Writing the handoff note can fail (a full disk); the batch's callers have their answers, and
    the calls queued behind it still run."""
    model = Model()

    class FailingNote(Turn):
        def release(self, handoff=()):
            super().release(handoff)
            if len(self.released) == 1:
                raise OSError("no space left for the note")

    async def scenario():
        b = turn_batcher(model, FailingNote())
        model.gate.clear()
        first = asyncio.create_task(b.submit("a"))
        await asyncio.to_thread(model.entered.wait, 10)
        queued = asyncio.create_task(b.submit("b"))  # waits behind "a"'s batch, then its turn's release
        await asyncio.sleep(0.05)
        model.gate.set()
        assert (await first)[0] == "A"
        assert (await asyncio.wait_for(queued, 5))[0] == "B"

    asyncio.run(scenario())


def test_a_turn_waits_a_moment_for_the_calls_handed_over_and_no_longer():
    """The sessions the other tier just answered are on their way: the batch waits for those this
    replica holds (not for one it does not hold), at most a share of its recent batch time, and
    never past GATHER_MAX_S."""
    model = Model()
    turn = Turn(handed=("b", "c", "elsewhere"))

    async def scenario():
        b = turn_batcher(model, turn, holds=lambda session: session != "elsewhere")
        assert (await b.submit("warm"))[0] == "WARM"  # a first batch: its time bounds later waits
        b._batch_s = 0.15 / GATHER_SHARE  # a 0.15 s share of it, capped at GATHER_MAX_S
        assert GATHER_MAX_S < 0.15
        late = []

        async def arrive(item, delay):
            await asyncio.sleep(delay)
            late.append(asyncio.create_task(b.submit(item)))

        first = asyncio.create_task(b.submit("a"))
        await asyncio.gather(arrive("b", GATHER_MAX_S / 4), arrive("c", GATHER_MAX_S / 2))
        assert [r for r, _ in await asyncio.gather(first, *late)] == ["A", "B", "C"]
        assert b.gathers == 1 and GATHER_MAX_S / 2 <= b.gather_s < GATHER_MAX_S + 0.05

        # "b" and "c" never come: the wait ends at its bound, and the batch runs without them.
        for batch_s, bound in ((1.0, GATHER_MAX_S), (0.1, 0.1 * GATHER_SHARE)):
            b._batch_s = batch_s
            started = asyncio.get_running_loop().time()
            assert (await b.submit("a.2"))[0] == "A.2"
            waited = asyncio.get_running_loop().time() - started
            assert bound <= waited < bound + 0.1

    asyncio.run(scenario())
    assert model.log == [("batch", ["warm"]), ("batch", ["a", "b", "c"]), ("batch", ["a.2"]), ("batch", ["a.2"])]


def test_a_lone_session_never_waits_for_company():
    """At one stream the session handed over is the one already queued: its call runs at once."""
    model = Model()
    turn = Turn(handed=("a",))

    async def scenario():
        b = turn_batcher(model, turn)
        b._batch_s = 10.0
        for n in range(3):
            assert (await b.submit(f"a.{n}"))[0] == f"A.{n}"
        assert b.gathers == 0 and b.gather_s == 0.0

    asyncio.run(scenario())
