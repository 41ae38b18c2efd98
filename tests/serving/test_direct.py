"""The tiers' direct channel over real gRPC on this machine: what a tier method answers, raises or
cancels reaches the router as over Serve's handle; a caller that gives up stops the tier's work; a
replica that is gone is told apart from a call that failed, so the call can be placed again."""

from __future__ import annotations

import asyncio
import pickle

import grpc
import numpy as np
import pytest
from ray.serve.exceptions import RequestCancelledError
from speccascade.serving.direct import (
    METHODS,
    SERVICE,
    TOKEN_METADATA,
    DirectChannels,
    DirectServer,
    DirectUnavailableError,
)
from speccascade.serving.wire import Endpoint

MESSAGE_BYTES = 64 * 2**20


class StandInTier:
    """The four methods a tier answers on its direct channel."""

    def __init__(self):
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.gate = asyncio.Event()
        self.released: list[str] = []

    async def draft(self, call):
        if call == "slow":
            self.started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if call == "ended":
            raise asyncio.CancelledError("session s1 has ended")  # as `ModelTier._serve` does
        if call == "bad":
            raise ValueError("block_size=0 is out of range")
        if call == "gated":
            self.started.set()
            await self.gate.wait()
        if call == "unpicklable":
            return lambda: None
        return {"echo": call}

    async def verify(self, rows: np.ndarray):
        return rows * 2

    async def release(self, session_id: str) -> bool:
        self.released.append(session_id)
        return True

    async def progress(self):
        return "moving"


def scenario(body):
    """Run `body(tier, server, channels, endpoint)` against a stand-in tier's direct server."""

    async def run():
        tier = StandInTier()
        server = DirectServer(tier, host="127.0.0.1", message_bytes=MESSAGE_BYTES)
        channels = DirectChannels(message_bytes=MESSAGE_BYTES)
        endpoint = await server.endpoint()
        try:
            return await body(tier, server, channels, endpoint)
        finally:
            await channels.close()
            await server.stop()

    return asyncio.run(run())


def test_every_tier_method_answers_over_the_channel_and_the_server_starts_once():
    async def body(tier, server, channels, endpoint):
        assert set(server.methods) == set(METHODS)
        assert await server.endpoint() == endpoint  # asked again: the same server
        assert await channels.call(endpoint, "draft", "block") == {"echo": "block"}
        assert await channels.call(endpoint, "release", "s1") is True and tier.released == ["s1"]
        assert await channels.call(endpoint, "progress") == "moving"

    scenario(body)


def test_messages_past_grpcs_default_bound_travel():
    """A verify call with whole float32 rows of a long block runs to tens of MB (gRPC's default
    bound is 4 MiB)."""
    rows = np.arange(3 * 2**20, dtype=np.float32)  # 12 MiB each way

    async def body(tier, server, channels, endpoint):
        return await channels.call(endpoint, "verify", rows)

    np.testing.assert_array_equal(scenario(body), rows * 2)


def test_a_tier_error_reaches_the_caller_as_itself():
    async def body(tier, server, channels, endpoint):
        with pytest.raises(ValueError, match="block_size=0 is out of range"):
            await channels.call(endpoint, "draft", "bad")
        assert await channels.call(endpoint, "draft", "after") == {"echo": "after"}  # the channel still works

    scenario(body)


def test_a_call_the_tier_cancels_ends_as_serves_cancellation():
    async def body(tier, server, channels, endpoint):
        with pytest.raises(RequestCancelledError, match="session s1 has ended"):
            await channels.call(endpoint, "draft", "ended")

    scenario(body)


def test_a_caller_that_gives_up_cancels_the_tiers_work():
    async def body(tier, server, channels, endpoint):
        response = channels.call(endpoint, "draft", "slow")
        await asyncio.wait_for(tier.started.wait(), 10)
        response.cancel()
        with pytest.raises(asyncio.CancelledError):
            await response
        await asyncio.wait_for(tier.cancelled.wait(), 10)

    scenario(body)


def test_a_replica_that_is_gone_is_unavailable_and_its_channel_forgotten():
    async def body(tier, server, channels, endpoint):
        assert await channels.call(endpoint, "progress") == "moving"
        await server.stop()
        with pytest.raises(DirectUnavailableError, match=f"draft at {endpoint}: UNAVAILABLE"):
            await channels.call(endpoint, "draft", "block")
        assert endpoint.address not in channels._channels

    scenario(body)


def test_an_address_that_no_longer_serves_a_tier_is_unavailable():
    """Another gRPC server at a replica's old address answers UNIMPLEMENTED: not our replica."""
    async def body(tier, server, channels, endpoint):
        other = grpc.aio.server()
        port = other.add_insecure_port("127.0.0.1:0")
        await other.start()
        try:
            with pytest.raises(DirectUnavailableError, match="UNIMPLEMENTED"):
                await channels.call(Endpoint(f"127.0.0.1:{port}", endpoint.token), "draft", "block")
            assert f"127.0.0.1:{port}" not in channels._channels
        finally:
            await other.stop(None)

    scenario(body)


def test_an_answer_that_cannot_come_back_fails_over_without_dropping_the_channel():
    async def body(tier, server, channels, endpoint):
        with pytest.raises(DirectUnavailableError, match="draft at .*: UNKNOWN"):
            await channels.call(endpoint, "draft", "unpicklable")
        assert endpoint.address in channels._channels  # the replica is there: other sessions keep it
        assert await channels.call(endpoint, "draft", "after") == {"echo": "after"}

    scenario(body)


def test_dropping_a_channel_never_cancels_another_sessions_call_on_it():
    """One session finds the replica unreachable while another's call is still on the channel:
    that call ends as the tier answers it, and only then is the channel closed."""
    async def body(tier, server, channels, endpoint):
        response = channels.call(endpoint, "draft", "gated")
        await asyncio.wait_for(tier.started.wait(), 10)
        channels.forget(endpoint.address)
        await asyncio.sleep(0.2)
        tier.gate.set()
        assert await response == {"echo": "gated"}
        await asyncio.sleep(0)
        assert endpoint.address not in channels._channels

    scenario(body)


def test_a_call_without_the_replicas_token_is_refused_before_its_payload_is_unpickled():
    """Reaching the port is not enough: the token is told only through Serve. A router holding a
    restarted replica's old token is refused like an unreachable replica (the session is placed
    again)."""
    async def body(tier, server, channels, endpoint):
        with pytest.raises(DirectUnavailableError, match="PERMISSION_DENIED"):
            await channels.call(Endpoint(endpoint.address, "a-stale-token"), "release", "s1")
        async with grpc.aio.insecure_channel(endpoint.address) as channel:
            stub = channel.unary_unary(f"/{SERVICE}/draft")
            for metadata in ((), ((TOKEN_METADATA, "guess"),)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub(b"not a pickle", metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # not a failed unpickle
            # With the token it is unpickled, and the failure to is the answer.
            ok, error = pickle.loads(await stub(b"not a pickle", metadata=((TOKEN_METADATA, endpoint.token),)))
            assert not ok and isinstance(error, pickle.UnpicklingError)
        assert tier.released == [] and server.calls == 1
        assert await channels.call(endpoint, "release", "s1") and tier.released == ["s1"]

    scenario(body)


def test_a_tier_answers_only_the_calls_it_has():
    class DrafterOnly:
        async def draft(self, call):
            return call

    server = DirectServer(DrafterOnly(), host="127.0.0.1", message_bytes=MESSAGE_BYTES)
    assert set(server.methods) == {"draft"}
