"""The router's tier client against a stand-in tier: a call that outlives its timeout keeps waiting
on a replica that is busy (overloaded), and is retried on one that is stuck, silent or gone."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from speccascade.config.app import RouterConfig
from speccascade.serving.batching import Progress
from speccascade.serving.clients import TierClient, TierUnavailableError, Transport
from speccascade.serving.direct import DirectServer, Route
from speccascade.serving.wire import Endpoint

TIMEOUT_S = 0.2
NEVER_S = 3600.0


class Reply:
    """A Serve response stand-in: awaitable, answers `value` after `after_s`, can be cancelled."""

    def __init__(self, after_s: float, value):
        self.cancelled = False
        self._answer = asyncio.ensure_future(self._later(after_s, value))

    @staticmethod
    async def _later(after_s: float, value):
        await asyncio.sleep(after_s)
        return value

    def __await__(self):
        return self._answer.__await__()

    def cancel(self):
        self.cancelled = True
        self._answer.cancel()


class StandInTier:
    """An expert deployment's handle: `verify` answers after `answer_after_s`; `progress` reports
    `progress` after `progress_after_s` (the replica's event loop answers at once unless told)."""

    deployment_name, app_name = "Expert", "app"

    def __init__(self, answer_after_s: float, progress: Progress, progress_after_s: float = 0.0, running: int = 1):
        self.answer_after_s, self.state, self.progress_after_s = answer_after_s, progress, progress_after_s
        self.running = running
        self.replies: list[Reply] = []
        self.probes = 0

    def options(self, *, multiplexed_model_id: str):
        assert multiplexed_model_id == "s1"  # calls and probes go where the session's calls go
        return self

    @property
    def verify(self):
        def remote(call):
            self.replies.append(Reply(self.answer_after_s, f"verified {call.session_id}"))
            return self.replies[-1]
        return SimpleNamespace(remote=remote)

    @property
    def progress(self):
        def remote():
            self.probes += 1
            return Reply(self.progress_after_s, self.state)
        return SimpleNamespace(remote=remote)


class Counted:
    def __init__(self):
        self.count = 0

    def inc(self, tags=None):
        self.count += 1

    def observe(self, value, tags=None):
        self.count += 1


def call(tier: StandInTier, attempts: int = 2):
    metrics = SimpleNamespace(tier_retries=Counted(), tier_busy_waits=Counted(), tier_call_seconds=Counted())
    config = RouterConfig(tier_call_timeout_s=TIMEOUT_S, tier_call_attempts=attempts, tier_transport="grpc")
    client = TierClient(tier, tier="expert", config=config, metrics=metrics)

    async def running_replicas():
        return tier.running

    client.running_replicas = running_replicas
    transport = Transport()

    async def scenario():
        return await client.call("verify", SimpleNamespace(session_id="s1"), rule="lossless", transport=transport,
                                 route=Route("s1"))

    return asyncio.run(scenario()), metrics, transport


BUSY = Progress(queued=7, running=True, still_s=0.01)
STUCK = Progress(queued=7, running=True, still_s=30.0)


def test_a_call_on_a_busy_replica_keeps_its_place_past_the_timeout():
    tier = StandInTier(answer_after_s=4 * TIMEOUT_S, progress=BUSY)
    result, metrics, transport = call(tier)
    assert result == "verified s1"
    assert len(tier.replies) == 1 and not tier.replies[0].cancelled  # not retried: no work repeated
    assert transport.tier_retries == 0 and metrics.tier_retries.count == 0
    assert metrics.tier_busy_waits.count == tier.probes >= 3


@pytest.mark.parametrize("progress,progress_after_s,reason", [
    (STUCK, 0.0, "the replica's model has run no pass for 30s"),
    (BUSY, NEVER_S, "did not say within 0.2s whether it is working"),
], ids=["still-forward-thread", "silent-replica"])
def test_a_call_on_a_stuck_replica_is_retried_then_the_tier_is_unavailable(progress, progress_after_s, reason):
    tier = StandInTier(answer_after_s=NEVER_S, progress=progress, progress_after_s=progress_after_s)
    with pytest.raises(TierUnavailableError) as error:
        call(tier, attempts=2)
    assert "2 attempts of verify failed" in str(error.value) and reason in str(error.value)
    assert len(tier.replies) == 2 and all(reply.cancelled for reply in tier.replies)  # nothing left running


def test_a_tier_without_running_replicas_is_unavailable_at_the_first_timeout():
    tier = StandInTier(answer_after_s=NEVER_S, progress=BUSY, running=0)
    with pytest.raises(TierUnavailableError) as error:
        call(tier, attempts=3)
    assert "has no running replica (a verify call waited 0.2s)" in str(error.value)
    assert len(tier.replies) == 1 and tier.replies[0].cancelled and tier.probes == 0


@pytest.mark.parametrize("transport,by_reference", [("direct", False), ("grpc", False), ("ray", True)])
def test_the_router_reaches_a_tier_over_the_configured_transport(transport, by_reference):
    """grpc: Serve's channel between replicas (`_by_reference=False`), which direct takes for a
    session's first call; ray: actor calls."""
    from speccascade.serving.clients import tier_handle

    class Handle:
        def options(self, **options):
            self.options_set = options
            return self

    handle = tier_handle(Handle(), RouterConfig(tier_transport=transport))
    assert handle.options_set == {"_by_reference": by_reference}
    assert RouterConfig().tier_transport == "direct"


class Answered(SimpleNamespace):
    """A tier's reply: which way it came, and the answering replica's direct endpoint."""


class DirectReplica:
    """A tier replica's methods as its direct channel serves them."""

    def __init__(self):
        self.endpoint: str | None = None
        self.calls = 0
        self.released: list[str] = []

    async def verify(self, call):
        self.calls += 1
        return Answered(via="direct", endpoint=self.endpoint)

    async def release(self, session_id):
        self.released.append(session_id)
        return True


class PlacingTier(StandInTier):
    """Serve's handle: places the session on `replica` and answers with its endpoint."""

    def __init__(self):
        super().__init__(answer_after_s=0.0, progress=BUSY)
        self.replica: DirectReplica | None = None
        self.released: list[str] = []

    @property
    def verify(self):
        def remote(call):
            self.replies.append(Reply(0.0, Answered(via="serve", endpoint=self.replica.endpoint)))
            return self.replies[-1]
        return SimpleNamespace(remote=remote)

    @property
    def release(self):
        def remote(session_id):
            self.released.append(session_id)
            return Reply(0.0, True)
        return SimpleNamespace(remote=remote)


def test_direct_transport_keeps_a_session_on_the_replica_serve_placed_it_on_and_places_it_again_when_it_is_gone():
    metrics = SimpleNamespace(tier_retries=Counted(), tier_busy_waits=Counted(), tier_call_seconds=Counted())
    serve_handle = PlacingTier()
    client = TierClient(serve_handle, tier="expert", config=RouterConfig(tier_transport="direct"), metrics=metrics)
    transport, route, session = Transport(), Route("s1"), SimpleNamespace(session_id="s1")

    async def start(replica: DirectReplica) -> DirectServer:
        server = DirectServer(replica, host="127.0.0.1", message_bytes=2**20)
        replica.endpoint = await server.endpoint()
        serve_handle.replica = replica
        return server

    async def verify():
        return await client.call("verify", session, rule="lossless", transport=transport, route=route)

    async def scenario():
        first, second = DirectReplica(), DirectReplica()
        first_server = await start(first)
        placed = await verify()
        assert placed.via == "serve" and route.endpoint == first.endpoint
        assert [(await verify()).via for _ in range(3)] == ["direct"] * 3 and first.calls == 3
        assert len(serve_handle.replies) == 1
        await first_server.stop()  # the replica is gone, and Serve has not noticed yet
        assert (await verify()).via == "serve" and transport.tier_retries == 1
        assert route.endpoint is None  # Serve still named the unreachable replica: not bound to again
        second_server = await start(second)  # Serve places the session on another replica
        replaced = await verify()
        assert replaced.via == "serve" and route.endpoint == second.endpoint
        assert transport.tier_retries == 1 and len(serve_handle.replies) == 3
        assert (await verify()).via == "direct" and second.calls == 1
        assert await client.release(route) and second.released == ["s1"] and serve_handle.released == []
        await second_server.stop()
        assert await client.release(route) and serve_handle.released == ["s1"]  # gone: through Serve
        await client.direct.close()

    asyncio.run(scenario())


def test_without_the_direct_transport_every_call_goes_through_serve():
    metrics = SimpleNamespace(tier_retries=Counted(), tier_busy_waits=Counted(), tier_call_seconds=Counted())
    serve_handle = PlacingTier()
    serve_handle.replica = SimpleNamespace(endpoint=Endpoint("10.0.0.1:1234", "token"))  # tiers with direct channels
    client = TierClient(serve_handle, tier="expert", config=RouterConfig(tier_transport="grpc"), metrics=metrics)
    route = Route("s1")

    async def scenario():
        for _ in range(2):
            await client.call("verify", SimpleNamespace(session_id="s1"), rule="lossless", transport=Transport(),
                              route=route)

    asyncio.run(scenario())
    assert len(serve_handle.replies) == 2 and route.endpoint is None and client.direct is None


class RecordingTier:
    """A tier client that answers every verify call at once and records it."""

    def __init__(self):
        from speccascade.engine.blocks import CallReport, VerifyOutcome

        self.calls = []
        self.metrics = SimpleNamespace(context_resends=Counted())
        self.tier = "expert"
        self._reply = lambda: SimpleNamespace(outcome=VerifyOutcome(0, 7, True, 0), needs_context=False, nbytes=16,
                                              report=CallReport(queued_s=0.25, forward_s=0.5))

    async def call(self, method, call, *, rule, transport, route):
        self.calls.append((method, call))
        return self._reply()


def test_an_early_prefill_is_a_verify_of_an_empty_block_after_the_prompt_and_only_for_a_long_prompt():
    """The prompt travels once: the first verify after the prefill sends only its block."""
    from speccascade.engine.blocks import EMPTY_BLOCK, DraftedBlock
    from speccascade.engine.jobs import PREFILL_THRESHOLD
    from speccascade.options import GREEDY, Rule
    from speccascade.serving.clients import RemoteExpert

    tier = RecordingTier()
    expert = RemoteExpert(tier, "s1", Transport(), tag="lossless")
    short = list(range(3, 3 + PREFILL_THRESHOLD))
    assert asyncio.run(expert.prefill(short, Rule.LOSSLESS, 0.0, GREEDY, 1)) is None and tier.calls == []
    prompt = list(range(3, 3 + PREFILL_THRESHOLD + 1))
    report = asyncio.run(expert.prefill(prompt, Rule.TOKEN, 0.3, GREEDY, 1))
    (method, call), = tier.calls
    assert method == "verify" and call.block == EMPTY_BLOCK and call.start == len(prompt)
    assert call.delta.tokens.tolist() == prompt and (call.rule, call.alpha, call.seed) == (Rule.TOKEN, 0.3, 1)
    assert (report.queued_s, report.forward_s) == (0.25, 0.5)
    block = DraftedBlock(tokens=(9, 9), max_q=np.array([0.5, 0.5], dtype=np.float32))
    asyncio.run(expert.verify(prompt + [9, 9], len(prompt), block, Rule.TOKEN, 0.3, GREEDY, 1))
    assert tier.calls[-1][1].delta.position == len(prompt) and tier.calls[-1][1].delta.tokens.tolist() == [9, 9]


def test_no_early_prefill_for_a_prompt_the_expert_tier_already_holds():
    """A request that asked for prompt logprobs had the whole prompt scored first."""
    from speccascade.engine.jobs import PREFILL_THRESHOLD
    from speccascade.options import GREEDY, Rule
    from speccascade.serving.clients import RemoteExpert

    tier = RecordingTier()
    expert = RemoteExpert(tier, "s1", Transport(), tag="lossless")
    prompt = list(range(3, 3 + 3 * PREFILL_THRESHOLD))
    expert.sent.sent(expert.sent.delta(prompt), prompt)  # as the prompt-scoring call leaves it
    assert asyncio.run(expert.prefill(prompt, Rule.LOSSLESS, 0.0, GREEDY, 1)) is None and tier.calls == []
    longer = prompt + list(range(PREFILL_THRESHOLD + 1))  # more than a threshold's worth the tier lacks
    assert asyncio.run(expert.prefill(longer, Rule.LOSSLESS, 0.0, GREEDY, 1)) is not None
    assert tier.calls[-1][1].delta.position == len(prompt)
