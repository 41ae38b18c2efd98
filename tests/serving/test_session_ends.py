"""No cache outlives its request, whatever the order in which a release and the session's calls
reach a tier replica. Without a cluster: the session store, and the tiers themselves driven by hand
with a gate inside the model pass, so a release overtakes an in-flight call deterministically."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from speccascade.config.app import TierConfig
from speccascade.engine.backends import BACKEND_KINDS, backend_class
from speccascade.engine.blocks import DraftedBlock, DraftPayload, SampleRows
from speccascade.options import Rule, SamplingParams
from speccascade.serving.sessions import SessionEndedError, SessionStore
from speccascade.serving.tiers import DrafterTier, ExpertTier
from speccascade.serving.wire import DraftCall, SentTokens, TokenDelta, VerifyCall

from ..conftest import tiny_qwen2

VOCAB = 1000
CONTEXT = [5, 17, 42, 99, 3, 250, 7, 61]
GREEDY = SamplingParams()
GREEDY_PAYLOAD = DraftPayload(SampleRows.NONE)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=BACKEND_KINDS)
def store(request):
    backend = backend_class(request.param)(tiny_qwen2(VOCAB, seed=0), name="tiny", **(
        {"slots": 4} if request.param == "static" else {}))
    return SessionStore(backend, budget_mb=64, idle_timeout_s=60.0, clock=FakeClock())


def test_a_call_after_its_release_is_refused_and_caches_nothing(store):
    store.backend.distributions(store.get("a"), CONTEXT, 1)
    assert store.release("a")
    with pytest.raises(SessionEndedError, match="already released"):
        store.get("a")
    with pytest.raises(SessionEndedError):
        store.check_live("a")
    stats = store.stats()
    assert (stats.sessions, stats.released, stats.late_calls) == (0, 1, 2)


def test_live_names_the_sessions_held_and_not_ended(store):
    """What the batcher reads to tell whether a stream is decoding: an ended session whose cache
    is not yet freed is not live."""
    store.get("a"), store.get("b")
    assert store.live() == ["a", "b"]
    store.end("a")
    assert "a" in store and store.live() == ["b"]
    store.free("a")
    assert store.live() == ["b"]


def test_a_release_that_arrives_before_any_call_still_ends_the_session(store):
    assert not store.release("b")  # nothing cached yet: the release overtook the session's first call
    with pytest.raises(SessionEndedError):
        store.get("b")
    assert store.stats().sessions == 0


def test_idle_sessions_are_reclaimed_and_recompute_while_released_ids_are_forgotten(store):
    clock = store.clock
    store.backend.distributions(store.get("abandoned"), CONTEXT, 1)  # its router died: never released
    store.release("ended")
    clock.now = 50.0
    store.backend.distributions(store.get("live"), CONTEXT, 1)
    clock.now = 61.0
    assert store.reclaim_idle() == 1
    assert "abandoned" not in store and "live" in store
    stats = store.stats()
    assert (stats.reclaimed, stats.ended_remembered) == (1, 0)
    # Reclaiming is not an ending: a slow but live request just recomputes.
    assert store.get("abandoned").cached_length == 0
    # The released id was forgotten after the timeout, so memory stays bounded.
    store.get("ended")
    if store.backend.kind == "static":
        assert store.backend.occupied_slots == 1  # "live" only: the reclaimed slot went back


def tier_config(model_dir: str, backend: str) -> TierConfig:
    return TierConfig(model=model_dir, dtype="fp32", backend=backend, max_batch_size=4,
                      static={"slots": 4, "cuda_graphs": False})


class Gate:
    """Holds the tier's next model pass until opened: `entered` is set when the pass has begun."""

    def __init__(self, backend):
        self.entered, self.open = threading.Event(), threading.Event()
        self._score, self._armed = backend.score, True

        def gated(jobs):
            if self._armed:
                self._armed = False
                self.entered.set()
                self.open.wait(timeout=30)
            return self._score(jobs)

        backend.score = gated

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30), "the model pass never started"


def assert_nothing_cached(tier) -> None:
    assert tier.sessions.stats().sessions == 0
    if tier.backend.kind == "static":
        assert tier.backend.occupied_slots == 0


@pytest.fixture(scope="module", params=BACKEND_KINDS)
def drafter(request, tiny_model_dirs):
    return DrafterTier(tier_config(tiny_model_dirs[0], request.param))


@pytest.fixture(scope="module", params=BACKEND_KINDS)
def expert(request, tiny_model_dirs):
    return ExpertTier(tier_config(tiny_model_dirs[1], request.param))


def whole(tokens) -> TokenDelta:
    """A call's delta that carries the whole sequence (what a session's first call sends)."""
    return SentTokens().delta(tokens, whole=True)


def draft_call(session_id: str, gamma: int, context=CONTEXT) -> DraftCall:
    return DraftCall(session_id, whole(context), gamma, GREEDY, 0, GREEDY_PAYLOAD)


def test_a_release_overtaking_an_in_flight_draft_stops_it_and_nothing_stays_cached(drafter):
    async def scenario():
        gate = Gate(drafter.backend)
        call = asyncio.create_task(drafter.draft(draft_call("s1", 4)))
        await gate.wait_entered()  # the draft's first step is in the model; three more steps to go
        release = asyncio.create_task(drafter.release("s1"))  # queued behind the pass in progress
        await asyncio.sleep(0.05)
        gate.open.set()
        assert await release  # it freed the cache the first step built
        return (await asyncio.gather(call, return_exceptions=True))[0]

    ended = asyncio.run(scenario())
    assert_nothing_cached(drafter)  # the draft's later steps did not build the session again...
    assert isinstance(ended, asyncio.CancelledError)  # ...they found it ended and stopped
    assert drafter.sessions.stats().late_calls == 1


def test_a_release_overtaking_an_in_flight_verify_frees_what_the_verify_built(expert):
    async def scenario():
        gate = Gate(expert.backend)
        block = DraftedBlock(tokens=(11, 12), max_q=np.array([0.9, 0.8], dtype=np.float32))
        call = asyncio.create_task(expert.verify(VerifyCall("s2", whole(CONTEXT + [11, 12]), len(CONTEXT), block,
                                                            Rule.LOSSLESS, 0.0, GREEDY, 0)))
        await gate.wait_entered()
        release = asyncio.create_task(expert.release("s2"))
        await asyncio.sleep(0.05)
        gate.open.set()
        reply = await call  # its one pass was already running: answered (nobody will read it)...
        assert reply.outcome.num_accepted in (0, 1, 2)
        assert await release  # ...and the release, which waited for that pass, freed its cache

    asyncio.run(scenario())
    assert_nothing_cached(expert)


def test_a_call_arriving_after_its_release_is_cancelled_without_a_model_pass(drafter):
    async def scenario():
        assert not await drafter.release("s3")
        passes = drafter.backend.forward_calls
        with pytest.raises(asyncio.CancelledError):
            await drafter.draft(draft_call("s3", 3))
        assert drafter.backend.forward_calls == passes

    asyncio.run(scenario())
    assert_nothing_cached(drafter)


def test_a_finished_session_released_normally_frees_its_cache(drafter):
    async def scenario():
        reply = await drafter.draft(draft_call("s4", 3))
        assert len(reply.block.tokens) == 3 and "s4" in drafter.sessions
        assert await drafter.release("s4")

    asyncio.run(scenario())
    assert_nothing_cached(drafter)


def test_a_release_whose_caller_stops_waiting_behind_a_pass_still_frees_the_cache(drafter):
    """The router's release call can be cancelled (a timeout, a dropped connection) while the free
    waits for another session's pass; the session has ended, so the free must still happen."""
    async def scenario():
        await drafter.draft(draft_call("s5", 2))
        gate = Gate(drafter.backend)
        other = asyncio.create_task(drafter.draft(draft_call("s6", 2)))
        await gate.wait_entered()
        release = asyncio.create_task(drafter.release("s5"))
        await asyncio.sleep(0.05)
        release.cancel()  # its free is still queued behind s6's pass
        gate.open.set()
        await other
        await drafter.batcher.run_between_batches(lambda: None)  # everything queued on the thread has run
        assert "s5" not in drafter.sessions
        assert await drafter.release("s6")

    asyncio.run(scenario())
    assert_nothing_cached(drafter)
