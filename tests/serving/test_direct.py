"""The tiers' direct channel over real TCP connections on this machine: what a tier method answers,
raises or cancels reaches the router as over Serve's handle; calls in flight on one connection are
answered in any order; a caller that gives up (or a connection that closes) stops the tier's work;
a replica that is gone, or a process that is not this replica, is told apart from a call that
failed, so the call can be placed again."""

from __future__ import annotations

import asyncio
import pickle
import random
import struct
import sys

import numpy as np
import pytest
from ray.serve.exceptions import RequestCancelledError
from speccascade.serving.direct import (
    GREETING,
    METHODS,
    DirectChannels,
    DirectServer,
    DirectUnavailableError,
    _dumps,
    _Frames,
    _loads,
)
from speccascade.serving.wire import Endpoint

try:
    import uvloop
except ImportError:  # (ray[serve] brings it, with uvicorn[standard])
    uvloop = None

MESSAGE_BYTES = 64 * 2**20
LOOPS = {"asyncio": asyncio.run, **({"uvloop": uvloop.run} if uvloop is not None else {})}
run_loop = asyncio.run  # the event loop a scenario runs on: each test runs on each of LOOPS
HEADER = struct.Struct("!IBQQ")  # the frame header as the module documents it: payload bytes, kind, call id, message bytes
CALL, CANCEL, RESULT, ERROR, REFUSED = 1, 2, 3, 4, 7


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


@pytest.fixture(autouse=True, params=sorted(LOOPS))
def on_each_event_loop(request, monkeypatch):
    """Ray runs the replicas' and the router's event loops on uvloop where it is installed, whose
    transports call a protocol's buffer methods in their own way; the channel must hold on both."""
    monkeypatch.setattr(sys.modules[__name__], "run_loop", LOOPS[request.param])


def scenario(body, *, tier_class=StandInTier, message_bytes: int = MESSAGE_BYTES):
    """Run `body(tier, server, channels, endpoint)` against a stand-in tier's direct server."""

    async def run():
        tier = tier_class()
        server = DirectServer(tier, host="127.0.0.1", message_bytes=message_bytes)
        channels = DirectChannels(message_bytes=message_bytes)
        endpoint = await server.endpoint()
        try:
            return await body(tier, server, channels, endpoint)
        finally:
            await channels.close()
            await server.stop()

    return run_loop(run())


async def raw_exchange(endpoint: Endpoint, opening: bytes, frame: bytes) -> tuple[int, int, bytes]:
    """Open a bare connection to the replica, send `opening` then `frame`; the first frame back."""
    host, port = endpoint.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(opening + frame)
        size, kind, call_id, total = HEADER.unpack(await asyncio.wait_for(reader.readexactly(HEADER.size), 10))
        assert size == total  # (the answers in these tests are short)
        return kind, call_id, await reader.readexactly(size)
    finally:
        writer.close()


def router_opening(endpoint: Endpoint) -> bytes:
    """What a router's connection opens with: the greeting and the replica's token."""
    token = endpoint.token.encode()
    return GREETING + bytes((len(token),)) + token


def frame(kind: int, call_id: int, payload: bytes, *, total: int | None = None, more: bool = False) -> bytes:
    """A frame as the module documents it; `total`: its whole message's length, when it is a piece."""
    return HEADER.pack(len(payload), kind | (0x80 if more else 0), call_id,
                       len(payload) if total is None else total) + payload


def call_frame(call_id: int, method: str, pickled: bytes) -> bytes:
    return frame(CALL, call_id, bytes((len(method),)) + method.encode() + pickled)


def test_every_tier_method_answers_over_the_channel_and_the_server_starts_once():
    async def body(tier, server, channels, endpoint):
        assert set(server.methods) == set(METHODS)
        assert await server.endpoint() == endpoint  # asked again: the same server
        assert await channels.call(endpoint, "draft", "block") == {"echo": "block"}
        assert await channels.call(endpoint, "release", "s1") is True and tier.released == ["s1"]
        assert await channels.call(endpoint, "progress") == "moving"
        assert server.calls == 3 and len(channels._connections) == 1  # one connection for them all

    scenario(body)


def test_calls_in_flight_on_one_connection_are_answered_as_each_finishes():
    """Sessions share the router's connection to a replica: a call the tier holds back does not hold
    back the answers to calls made after it."""
    async def body(tier, server, channels, endpoint):
        held = channels.call(endpoint, "draft", "gated")
        await asyncio.wait_for(tier.started.wait(), 10)
        answers = await asyncio.gather(*(channels.call(endpoint, "draft", f"s{index}") for index in range(20)))
        assert answers == [{"echo": f"s{index}"} for index in range(20)]
        tier.gate.set()
        assert await held == {"echo": "gated"}

    scenario(body)


def test_large_messages_travel_both_ways():
    """A verify call with whole float32 rows of a long block runs to tens of MB."""
    rows = np.arange(3 * 2**20, dtype=np.float32)  # 12 MiB each way

    async def body(tier, server, channels, endpoint):
        return await channels.call(endpoint, "verify", rows)

    np.testing.assert_array_equal(scenario(body), rows * 2)


def test_a_short_call_overtakes_a_long_message_on_the_same_connection():
    """Sessions sampling with whole float rows send megabytes a round: a greedy session's call made
    meanwhile on the same connection goes out between the long message's pieces, and its answer
    comes back before the long call's (frames in order, it would wait for the whole of it)."""
    rows = np.ones(8 * 2**20, dtype=np.float32)  # 32 MiB each way

    async def body(tier, server, channels, endpoint):
        assert await channels.call(endpoint, "progress") == "moving"  # the connection is open
        long = asyncio.ensure_future(channels.call(endpoint, "verify", rows))
        short = asyncio.ensure_future(channels.call(endpoint, "draft", "block"))
        done, _ = await asyncio.wait((long, short), return_when=asyncio.FIRST_COMPLETED, timeout=60)
        assert done == {short} and short.result() == {"echo": "block"}
        np.testing.assert_array_equal(await long, rows * 2)

    scenario(body)


def test_long_messages_interleave_arrive_whole_and_a_cancelled_one_is_forgotten_at_both_ends():
    first, second = (np.full(3 * 2**20, value, dtype=np.float32) for value in (1.0, 2.0))  # 12 MiB each

    async def body(tier, server, channels, endpoint):
        answers = await asyncio.gather(*(channels.call(endpoint, "verify", rows) for rows in (first, second)))
        np.testing.assert_array_equal(answers[0], first * 2)
        np.testing.assert_array_equal(answers[1], second * 2)
        (link,) = server._links
        verified = server.calls
        cancelled = channels.call(endpoint, "verify", np.zeros(12 * 2**20, dtype=np.float32))  # 48 MiB
        await asyncio.sleep(0.005)  # some of its pieces on their way
        cancelled.cancel()
        assert await channels.call(endpoint, "draft", "after") == {"echo": "after"}  # the connection goes on
        connection = channels._connections[endpoint]
        assert not connection.pending and not (await connection._opened)._long  # nothing more of it sent
        assert link.frames._partial == {}  # and what arrived of it forgotten, never run
        assert server.calls == verified + 1

    scenario(body)


def test_payloads_carry_array_data_out_of_band_and_arrays_come_back_writable():
    """A round's whole float rows are not copied into the pickle stream: the payload is the count of
    the buffers, the stream's size and theirs, the stream, then the arrays' bytes as they are, each
    aligned from the payload's first byte. Received into a bytearray (a long message), the arrays
    are built on it where they arrived; from immutable bytes, on a copy."""
    rows = np.arange(5 * 1000, dtype=np.float16).reshape(5, 1000)
    ids = np.arange(3, dtype=np.int64)
    prefix = b"\x06verify"
    payload = _dumps({"rows": rows, "ids": ids, "n": 2}, prefix=prefix)
    assert payload.startswith(prefix) and payload.endswith(ids.tobytes())
    count, stream_bytes, *sizes = struct.unpack_from("!IQ2Q", payload, len(prefix))
    assert (count, sizes) == (2, [rows.nbytes, ids.nbytes])
    assert payload.index(rows.tobytes()) % 64 == 0 and (len(payload) - ids.nbytes) % 64 == 0
    for received in (payload, bytearray(payload)):
        back = _loads(received, len(prefix))
        np.testing.assert_array_equal(back["rows"], rows)
        np.testing.assert_array_equal(back["ids"], ids)
        assert back["n"] == 2 and back["rows"].flags.writeable and back["rows"].flags.aligned
        assert np.shares_memory(back["rows"], np.frombuffer(received, dtype=np.uint8)) == isinstance(received, bytearray)
        back["rows"][0, 0] = 7  # the tiers may work on what they receive in place
    with pytest.raises(pickle.UnpicklingError, match="not a direct channel payload"):
        _loads(b"\xff\xff\xff\xff")
    with pytest.raises(pickle.UnpicklingError, match="ends at"):
        _loads(payload[:-1], len(prefix))


def test_a_call_in_pieces_is_answered():
    """The wire format of a long message: every piece but the last has the kind's high bit set."""
    async def body(tier, server, channels, endpoint):
        pickled = _dumps(("in pieces",))
        payload = bytes((len("draft"),)) + b"draft" + pickled
        half = len(payload) // 2
        frames = (frame(CALL, 9, payload[:half], total=len(payload), more=True)
                  + frame(CALL, 9, payload[half:], total=len(payload)))
        kind, call_id, answer = await raw_exchange(endpoint, router_opening(endpoint), frames)
        assert (kind, call_id, _loads(answer)) == (RESULT, 9, {"echo": "in pieces"})

    scenario(body)


def test_a_call_over_the_channels_bound_goes_through_serve_and_the_connection_stays():
    async def body(tier, server, channels, endpoint):
        assert await channels.call(endpoint, "progress") == "moving"
        with pytest.raises(DirectUnavailableError, match=r"verify at .*: a call of \d+ bytes is over the channel's bound"):
            await channels.call(endpoint, "verify", np.zeros(2**20, dtype=np.float32))
        with pytest.raises(DirectUnavailableError, match=r"verify at .*: its answer of \d+ bytes is over"):
            await channels.call(endpoint, "verify", np.zeros(3 * 2**16, dtype=np.float32))  # 768 KiB, 1.5 MiB back
        assert endpoint in channels._connections
        assert await channels.call(endpoint, "progress") == "moving"

    class Doubling(StandInTier):
        async def verify(self, rows):
            return np.concatenate([rows, rows])

    scenario(body, tier_class=Doubling, message_bytes=2**20 + 2**18)


def test_a_tier_error_reaches_the_caller_as_itself():
    async def body(tier, server, channels, endpoint):
        with pytest.raises(ValueError, match="block_size=0 is out of range"):
            await channels.call(endpoint, "draft", "bad")
        assert await channels.call(endpoint, "draft", "after") == {"echo": "after"}  # the channel still works

    scenario(body)


def test_a_call_the_tier_cancels_ends_as_serves_cancellation():
    async def body(tier, server, channels, endpoint):
        with pytest.raises(RequestCancelledError, match="draft at .*: session s1 has ended"):
            await channels.call(endpoint, "draft", "ended")
        assert await channels.call(endpoint, "progress") == "moving"

    scenario(body)


def test_a_caller_that_gives_up_cancels_the_tiers_work():
    async def body(tier, server, channels, endpoint):
        response = channels.call(endpoint, "draft", "slow")
        await asyncio.wait_for(tier.started.wait(), 10)
        response.cancel()
        with pytest.raises(asyncio.CancelledError):
            await response
        await asyncio.wait_for(tier.cancelled.wait(), 10)
        assert await channels.call(endpoint, "progress") == "moving"  # the connection is still in use

    scenario(body)


def test_a_router_that_goes_away_cancels_the_tiers_work_on_its_calls():
    async def body(tier, server, channels, endpoint):
        response = channels.call(endpoint, "draft", "slow")
        await asyncio.wait_for(tier.started.wait(), 10)
        await channels.close()
        with pytest.raises(DirectUnavailableError, match="the router closed its channels"):
            await response
        await asyncio.wait_for(tier.cancelled.wait(), 10)

    scenario(body)


def test_a_replica_that_is_gone_is_unavailable_and_its_connection_forgotten():
    async def body(tier, server, channels, endpoint):
        assert await channels.call(endpoint, "progress") == "moving"
        in_flight = channels.call(endpoint, "draft", "slow")
        await asyncio.wait_for(tier.started.wait(), 10)
        await server.stop(0)
        with pytest.raises(DirectUnavailableError, match=f"draft at {endpoint}: the replica closed the connection"):
            await in_flight
        assert endpoint not in channels._connections
        with pytest.raises(DirectUnavailableError, match=f"draft at {endpoint}: unreachable"):
            await channels.call(endpoint, "draft", "block")  # nothing listens there now
        assert endpoint not in channels._connections

    scenario(body)


def test_an_address_that_is_not_a_direct_channel_is_unavailable():
    """Another process at a replica's old address (here one that answers every connection with
    bytes that are not frames) is not our replica."""
    async def answer_junk(reader, writer):
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)
        await writer.drain()
        writer.close()

    async def body(tier, server, channels, endpoint):
        other = await asyncio.start_server(answer_junk, "127.0.0.1", 0)
        elsewhere = Endpoint(f"127.0.0.1:{other.sockets[0].getsockname()[1]}", endpoint.token)
        try:
            with pytest.raises(DirectUnavailableError, match=f"draft at {elsewhere}: unreachable"):
                await channels.call(elsewhere, "draft", "block")
            assert elsewhere not in channels._connections
        finally:
            other.close()

    scenario(body)


def test_an_answer_that_cannot_come_back_fails_over_without_dropping_the_connection():
    async def body(tier, server, channels, endpoint):
        with pytest.raises(DirectUnavailableError, match="draft at .*: its answer cannot be pickled"):
            await channels.call(endpoint, "draft", "unpicklable")
        assert endpoint in channels._connections  # the replica is there: other sessions keep it
        assert await channels.call(endpoint, "draft", "after") == {"echo": "after"}

    scenario(body)


def test_a_connection_without_the_replicas_token_is_refused_before_anything_on_it_is_unpickled():
    """Reaching the port is not enough: the token is told only through Serve. A router holding a
    restarted replica's old token is refused like an unreachable replica (the session is placed
    again)."""
    async def body(tier, server, channels, endpoint):
        stale = Endpoint(endpoint.address, "a-stale-token")
        with pytest.raises(DirectUnavailableError, match="release at .*: refused"):
            await channels.call(stale, "release", "s1")
        assert stale not in channels._connections
        garbage = call_frame(1, "draft", b"not a pickle")
        token = endpoint.token.encode()
        older = b"speccascade-direct/2\n" + bytes((len(token),)) + token  # a peer of the earlier wire format
        for opening in (b"", GREETING + b"\x05guess", b"GET / HTTP/1.1\r\n\r\n", older):
            kind, call_id, _ = await raw_exchange(endpoint, opening, garbage)
            assert (kind, call_id) == (REFUSED, 0)  # not a failed unpickle
        # With the token the payload is unpickled, and the failure to is the answer.
        kind, call_id, answer = await raw_exchange(endpoint, router_opening(endpoint), garbage)
        assert (kind, call_id) == (ERROR, 1) and isinstance(_loads(answer), pickle.UnpicklingError)
        assert tier.released == [] and server.calls == 1
        assert await channels.call(endpoint, "release", "s1") and tier.released == ["s1"]

    scenario(body)


def test_a_tier_answers_only_the_calls_it_has():
    class DrafterOnly:
        async def draft(self, call):
            return call

    async def body(tier, server, channels, endpoint):
        assert set(server.methods) == {"draft"}
        with pytest.raises(DirectUnavailableError, match="verify at .*: this replica has no method 'verify'"):
            await channels.call(endpoint, "verify", "block")
        assert await channels.call(endpoint, "draft", "block") == "block"

    scenario(body, tier_class=DrafterOnly)


def test_a_stopping_replica_answers_the_calls_in_progress_within_its_grace():
    async def body(tier, server, channels, endpoint):
        in_flight = channels.call(endpoint, "draft", "gated")
        await asyncio.wait_for(tier.started.wait(), 10)
        stopping = asyncio.ensure_future(server.stop(10))
        await asyncio.sleep(0.1)
        tier.gate.set()
        assert await in_flight == {"echo": "gated"}
        await asyncio.wait_for(stopping, 10)

    scenario(body)


def test_a_stopping_replica_drops_a_connection_whose_peer_stopped_reading():
    """A router that stopped reading (hung, or its node gone quiet) leaves an answer unsent: the
    replica's connection cannot finish closing, and its shutdown must not wait on it for ever."""
    import socket

    from speccascade.serving import direct

    async def body(tier, server, channels, endpoint):
        host, port = endpoint.address.rsplit(":", 1)
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # (Linux grows it to 32 MiB otherwise)
        peer.connect((host, int(port)))
        reader, writer = await asyncio.open_connection(sock=peer)  # never read from
        rows = np.ones(8 * 2**20, dtype=np.float32)  # a 32 MiB answer: more than the kernel holds
        payload = _dumps((rows,), prefix=b"\x06verify")  # (buffers aligned from the payload's first byte)
        writer.write(router_opening(endpoint) + frame(CALL, 1, payload))
        await writer.drain()
        async with asyncio.timeout(20):  # answered, and its answer stuck behind the full socket
            stuck_since = None
            while stuck_since is None or asyncio.get_running_loop().time() - stuck_since < 0.5:
                await asyncio.sleep(0.05)
                stuck = any(link.frames._paused for link in server._links)
                stuck_since = (stuck_since or asyncio.get_running_loop().time()) if stuck else None
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(server.stop(grace_s=1), 30)
        assert asyncio.get_running_loop().time() - started < direct.STOP_FLUSH_S + 5
        assert server._links == set()  # the connection was dropped, not left half closed
        writer.close()

    scenario(body)


def test_both_ends_notice_a_vanished_peer_within_a_minute_whether_the_connection_is_idle_or_not():
    """A peer whose node went away never closes its connection: without keepalive probes (Linux's
    default starts them after two hours) the router would keep binding sessions to it, and a replica
    would keep the calls of a router that is gone. Probes only go out on an idle connection: with a
    call written and never acknowledged, Linux retransmits for ~15 minutes unless told otherwise."""
    import socket

    from speccascade.serving import direct

    async def body(tier, server, channels, endpoint):
        assert await channels.call(endpoint, "progress") == "moving"
        connection = channels._connections[endpoint]
        (link,) = server._links
        for frames in ((await connection._opened).frames, link.frames):
            sock = frames.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            if hasattr(socket, "TCP_NOTSENT_LOWAT"):  # at most about a piece of a long message unsent
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == direct.PIECE_BYTES
            if hasattr(socket, "TCP_KEEPIDLE"):
                probes = (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                          sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                          sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))
                assert probes == (direct.KEEPALIVE_IDLE_S, direct.KEEPALIVE_INTERVAL_S, direct.KEEPALIVE_PROBES)
                assert probes[0] + probes[1] * probes[2] <= 60
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000

    scenario(body)


def test_on_an_open_connection_a_call_is_written_before_the_caller_next_waits_and_a_cancel_then_reaches_the_tier():
    """The decoding loop sends the next block's draft and goes on streaming the round: the call must
    be on its way before the loop's next await, and a call cancelled before its task ever ran must
    still reach the tier's method (which applies the call's tokens), stop the tier's work and leave
    nothing behind."""
    async def body(tier, server, channels, endpoint):
        assert await channels.call(endpoint, "progress") == "moving"  # the connection is open
        connection = channels._connections[endpoint]
        response = channels.call(endpoint, "draft", "slow")
        assert len(connection.pending) == 1  # written and awaiting its answer, with no await yet
        await asyncio.wait_for(tier.started.wait(), 10)
        response.cancel()
        with pytest.raises(asyncio.CancelledError):
            await response
        await asyncio.wait_for(tier.cancelled.wait(), 10)
        tier.started.clear()
        tier.cancelled.clear()
        response = channels.call(endpoint, "draft", "slow")
        response.cancel()  # before its task first runs
        with pytest.raises(asyncio.CancelledError):
            await response
        await asyncio.wait_for(tier.cancelled.wait(), 10)
        # Its CALL and CANCEL reach the replica in one read here: the call's method still starts
        # (where a tier applies the tokens the call carries) before the cancellation stops it.
        assert tier.started.is_set()
        await asyncio.sleep(0.2)
        assert connection.pending == {}
        assert all(not link.calls for link in server._links)  # the tier holds no call of it
        assert await channels.call(endpoint, "progress") == "moving"

    scenario(body)


def test_a_call_cancelled_in_the_same_read_as_it_arrives_still_reaches_the_tiers_method():
    """A busy replica reads a call and its cancellation together: the tier's method must still run
    up to its first wait (where a tier applies the tokens the call carries, which the router counts
    as applied) before the cancellation stops it; otherwise the session's next call is refused and
    its whole context sent again."""
    async def body(tier, server, channels, endpoint):
        host, port = endpoint.address.rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(router_opening(endpoint) + call_frame(1, "draft", _dumps(("slow",))) + frame(CANCEL, 1, b""))
        await writer.drain()
        await asyncio.wait_for(tier.cancelled.wait(), 10)
        assert tier.started.is_set()
        writer.close()

    scenario(body)


class RecordingTransport:
    """What `_Frames` needs of a transport, recording what is written and whether it was closed."""

    def __init__(self):
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name):
        return None

    def write(self, data):
        self.written += data

    def writelines(self, chunks):
        for chunk in chunks:
            self.written += chunk

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True


def frames_fed(stream: bytes, reads: list[int], *, limit: int = MESSAGE_BYTES, token: bytes | None = None):
    """A `_Frames` given `stream` as a socket would, `reads[i]` bytes at most at the i-th read (then
    whatever its buffer takes): the messages it delivered, its transport, and every buffer it offered
    straight into a message."""
    delivered: list[tuple[int, int, bytes | bytearray]] = []
    frames = _Frames(limit, lambda kind, call_id, payload: delivered.append((kind, call_id, payload)),
                     lambda error: None, token=token)
    transport = RecordingTransport()

    async def feed():
        frames.connection_made(transport)
        straight_in, at, index = [], 0, 0
        while at < len(stream) and not transport.closed:
            buffer = frames.get_buffer(-1)
            assert len(buffer) > 0
            if frames._into is not None:
                straight_in.append(buffer)
            size = min(len(buffer), reads[index % len(reads)], len(stream) - at)
            buffer[:size] = stream[at:at + size]
            at += size
            index += 1
            frames.buffer_updated(size)
        frames.connection_lost(None)
        return delivered, transport, straight_in

    return run_loop(feed())


def test_frames_arrive_whole_however_the_socket_splits_them_and_long_ones_straight_into_their_buffer():
    """Short frames are cut out of the scratch buffer, many a read; a long message's bytes go from
    the socket into the one buffer the message is delivered in, with short frames of other calls
    between its pieces. Reads that split headers, odd sizes and reads far larger than a frame all
    give the same messages."""
    rng = random.Random(7)
    long_message = rng.randbytes(700 * 1024)
    first, second = long_message[:300 * 1024], long_message[300 * 1024:]
    shorts = [rng.randbytes(size) for size in (0, 1, 40, 64 * 1024, 64 * 1024 + 1, 200 * 1024)]
    stream = (frame(CALL, 5, first, total=len(long_message), more=True)
              + b"".join(frame(CALL, 10 + index, short) for index, short in enumerate(shorts))
              + frame(CALL, 5, second, total=len(long_message)) + frame(2, 5, b""))  # then cancel it
    expected = [(CALL, 10 + index, short) for index, short in enumerate(shorts)] + [(CALL, 5, long_message), (2, 5, b"")]
    for reads in ([7, 4093, 13], [HEADER.size + 3, 100_000], [2**22]):
        delivered, transport, straight_in = frames_fed(stream, reads)
        assert [(kind, call_id, bytes(payload)) for kind, call_id, payload in delivered] == expected, reads
        assert not transport.closed
        long_delivered = delivered[len(shorts)][2]
        assert any(buffer.obj is long_delivered for buffer in straight_in), "the long message was gathered, not read into place"
    delivered, _, _ = frames_fed(stream[:HEADER.size + 1000], [1])  # a header a byte at a time; half a piece
    assert delivered == []


@pytest.mark.parametrize(("stream", "why"), [
    (frame(CALL, 1, b"x" * 10, total=20), "a piece of 10 bytes at 0 of a 20-byte message, nothing more to follow"),
    (frame(CALL, 1, b"x" * 20, total=20, more=True), "more to follow"),
    (frame(CALL, 1, b"x" * 10, total=30, more=True) + frame(RESULT, 1, b"y" * 20, total=30), "continuing a CALL message"),
    (frame(CALL, 1, b"x" * 10, total=30, more=True) + frame(CALL, 1, b"y" * 20, total=40), "of 40 bytes continuing"),
    (frame(CALL, 1, b"", total=2**30), "over the channel's bound"),
    (frame(0x7F, 1, b"x"), "unknown kind"),
    (frame(2, 1, b"x"), "a cancel frame of 1 bytes"),
])
def test_a_stream_that_breaks_the_framing_closes_the_connection_before_anything_of_it_is_delivered(stream, why, caplog):
    delivered, transport, _ = frames_fed(stream + frame(CALL, 2, b"after"), [4096], limit=2**20)
    assert transport.closed and delivered == []
    assert why in caplog.text


def test_a_replica_end_takes_frames_only_after_the_greeting_and_refuses_at_the_first_wrong_byte():
    token = b"t0ken"
    greeting = GREETING + bytes((len(token),)) + token
    delivered, transport, _ = frames_fed(greeting + frame(CALL, 3, b"call"), [5], token=token)
    assert delivered == [(CALL, 3, b"call")] and not transport.closed
    for opening in (b"X", GREETING[:-1] + b"X", GREETING + b"\x05t0kex", b"speccascade-direct/2\n" + b"\x05" + token):
        delivered, transport, _ = frames_fed(opening + frame(CALL, 3, b"call"), [3], token=token)
        assert delivered == [] and transport.closed
        size, kind, call_id, _ = HEADER.unpack_from(transport.written)
        assert (kind, call_id) == (REFUSED, 0)
    delivered, transport, _ = frames_fed(GREETING[:10], [4], token=token)  # a partial greeting waits
    assert delivered == [] and not transport.closed and transport.written == b""
