"""The tiers' direct channel: a session's calls straight from the router to the tier replica that
holds its cache, past Serve's request path (`RouterConfig.tier_transport: direct`).

Serve still places every session: its first call to a tier goes through the deployment handle, so
the session-affinity router (`affinity.py`) picks the replica, autoscaling and health decide which
replicas exist, and a replica that is gone is never chosen. The answer names the replica's own
endpoint, and the session's later calls to that tier (drafts or verifies, the progress question
of a call that waits long, the release) go there over one long-lived connection per replica.
When the replica cannot be reached (it died, or stopped after a scale-down), the call fails over to
Serve, which places the session again; the new replica recomputes it (`needs_context`), as after
any move.

Why: a call through Serve's handle crosses the handle's routing loop, the replica's request loop and
its user-code thread, with Serve's request bookkeeping at each end. On two shared cores the two
calls of a lossless round took 8.3 ms through Serve and 4.8 ms over gRPC straight to the replica.

Why not gRPC: a round's calls come one at a time, each to a process that has slept through the
other tier's pass. `grpc.aio` receives on a poller thread of its own that then wakes the event loop,
so every message wakes two threads in the receiving process; on two shared cores a call between
such idle processes took 1.2-1.6 ms over `grpc.aio` and 0.44-0.75 ms over a plain connection
(`scripts/bench_direct_channel.py`; BENCHMARKS.md, serving). The channel is therefore a plain TCP
connection read by the event loop itself, one per router and replica, with many calls in flight on
it (each frame: `_HEADER`, its payload's length, kind, call id and its whole message's length, then the
payload), read by an `asyncio.BufferedProtocol` into the buffers the messages are used from. A message over
`PIECE_BYTES` (a round's whole float rows under unfiltered sampling: megabytes) goes in pieces, one
piece of each such message in turn, with no more than about a piece unsent in the kernel
(`TCP_NOTSENT_LOWAT`), so a small call written meanwhile waits behind a piece rather than the whole
message, as HTTP/2 interleaves its frames (`_Outgoing`, `_Frames`).

The payloads are the same call and reply objects as over Serve (numpy arrays and small dataclasses),
pickled, arrays' bytes out of band after the pickle stream (`_dumps`): the channel runs between the
application's own processes inside the Ray cluster. Each replica draws a random token when it opens its channel and tells it only in answers through Serve;
a connection opens with the token, and one without it is refused before anything sent on it is
unpickled, so reaching the port is not enough to have the replica unpickle a payload (a replica
restarted at the same address has a new token: the router's old one is refused, and the session is
placed again). A tier's exception travels back as itself; a call the tier ends as cancelled (its
session was released or superseded) ends as Serve's `RequestCancelledError`, as over the handle; a
caller that stops waiting (or a connection that closes) cancels the tier's work on the call.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import itertools
import logging
import pickle
import secrets
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ray.serve.exceptions import RequestCancelledError

from .wire import Endpoint

log = logging.getLogger(__name__)

METHODS = ("draft", "verify", "release", "progress")
CONNECT_TIMEOUT_S = 2.0  # a replica's port that does not answer (gone, or closed by a firewall) fails this soon
GREETING_TIMEOUT_S = 10.0  # a connection that does not open with its greeting within this is closed
# A stopping replica's connections close once what was written on them has gone out; one whose
# peer has stopped reading is given this long, then dropped (Python 3.12's Server.wait_closed waits
# for every connection: a stuck one would hold the replica's shutdown for as long as its peer does).
STOP_FLUSH_S = 2.0
UNREACHABLE_COOLDOWN_S = 60.0  # an endpoint found unreachable is not bound to again for this long
# A peer that vanished without closing its connection (its node lost power, or the network between
# went down) is noticed by TCP keepalive probes: the first after this many idle seconds, then one
# every KEEPALIVE_INTERVAL_S, the connection given up after KEEPALIVE_PROBES unanswered (~1 min in
# all, against Linux's default of over two hours). Its calls then fail over to Serve.
KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3
# Keepalive probes only an idle connection. One with data written and not acknowledged (a call sent
# as the replica's node went away) is retransmitted instead, for ~15 minutes by Linux's default
# (tcp_retries2), and meanwhile every session bound to that replica would send its calls there and
# wait for their timeouts. Data unacknowledged for this long ends the connection as keepalive would:
# its calls fail over to Serve.
UNACKNOWLEDGED_TIMEOUT_S = KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_PROBES

# A connection opens with GREETING, one byte of token length and the token; then frames both ways.
GREETING = b"speccascade-direct/3\n"  # /3: every frame says its whole message's length (an older peer is refused)
MAX_TOKEN_BYTES = 255
_HEADER = struct.Struct("!IBQQ")  # this frame's payload bytes, kind (| _MORE), call id, its whole message's bytes
_MORE = 0x80  # on a frame's kind: a piece of a long message, more of which follows
# A longer message goes in pieces of this size, interleaved with other messages' frames; the kernel
# holds at most about this much of a connection's data unsent (TCP_NOTSENT_LOWAT), so a short frame
# waits behind a few hundred KiB at most (a millisecond or less between processes of one machine).
PIECE_BYTES = 128 * 1024
# Frames are read into a scratch buffer of this size; one whose payload is longer than
# STRAIGHT_IN_BYTES and has not all arrived is read the rest of the way straight into its message.
SCRATCH_BYTES = 256 * 1024
STRAIGHT_IN_BYTES = 64 * 1024


class _Kind(enum.IntEnum):
    CALL = 1  # router -> replica: method name (one byte of length, then ASCII) and pickled arguments
    CANCEL = 2  # router -> replica: the caller stopped waiting; the tier's work on the call is cancelled
    RESULT = 3  # replica -> router: the pickled answer
    ERROR = 4  # the tier's exception, pickled
    CANCELLED = 5  # the tier ended the call as cancelled (UTF-8 reason)
    UNAVAILABLE = 6  # the call cannot be answered here (UTF-8 reason): it goes through Serve instead
    REFUSED = 7  # call id 0: the connection's token is not this replica's (UTF-8 reason); then closed


class DirectUnavailableError(ConnectionError):
    """The replica at a session's endpoint could not be reached or could not answer the call; the
    call goes through Serve."""


class _ProtocolError(ConnectionError):
    """The peer broke the framing (or is not a direct channel at all)."""


_COUNTS = struct.Struct("!IQ")  # how many out-of-band buffers, the pickle stream's bytes
_ALIGN = 64  # each out-of-band buffer starts at a multiple of this from the payload's first byte


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _dumps(value: Any, prefix: bytes = b"") -> bytes:
    """`prefix`, then `value` pickled with its large contiguous buffers (numpy arrays' data) out of
    band, after the pickle stream rather than copied into it: the buffer count, the stream's size,
    each buffer's size, the stream, then the buffers, each aligned (`_ALIGN`) from the payload's
    first byte, so the receiver can use them where they arrived (a round's whole float16 rows: 0.1
    ms against 0.9 ms pickled in band). The whole is assembled once."""
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    raw = [buffer.raw() for buffer in buffers]
    parts = [prefix, _COUNTS.pack(len(raw), len(stream)), struct.pack(f"!{len(raw)}Q", *(r.nbytes for r in raw)), stream]
    at = len(prefix) + _COUNTS.size + 8 * len(raw) + len(stream)
    for buffer in raw:
        padding = _aligned(at) - at
        parts += (bytes(padding), buffer)
        at += padding + buffer.nbytes
    return b"".join(parts)


def _loads(payload: bytes | bytearray | memoryview, start: int = 0) -> Any:
    """What `_dumps` wrote into `payload`, from `start` (the length of its prefix). Arrays come back
    writable, as pickled in band: built on the payload where it is writable (a long message, read
    into a bytearray of its own: no copy), else on a copy of their bytes."""
    view = memoryview(payload)
    try:
        count, stream_bytes = _COUNTS.unpack_from(view, start)
        if count > len(view) // 8:
            raise struct.error(f"{count} buffers")
        sizes = struct.unpack_from(f"!{count}Q", view, start + _COUNTS.size)
    except struct.error as error:
        raise pickle.UnpicklingError(f"not a direct channel payload ({error})") from None
    stream_at = start + _COUNTS.size + 8 * count
    buffers, at = [], stream_at + stream_bytes
    for size in sizes:
        at = _aligned(at)
        buffers.append(view[at:at + size] if not view.readonly else bytearray(view[at:at + size]))
        at += size
    if at != len(view):
        raise pickle.UnpicklingError(f"a payload of {len(view)} bytes holding a stream of {stream_bytes} and "
                                     f"buffers of {sum(sizes)} ends at {at}")
    return pickle.loads(view[stream_at:stream_at + stream_bytes], buffers=buffers)


@dataclass(eq=False)
class _LongMessage:
    """A message going out in pieces: how much of it has been written."""

    kind: _Kind
    call_id: int
    payload: memoryview
    sent: int = 0

    @property
    def done(self) -> bool:
        return self.sent >= len(self.payload)


class _Outgoing:
    """Frames to one peer. A message of at most `PIECE_BYTES` is written at once (before the
    caller's next await); a longer one in pieces, its first at once when no other long message is
    under way, the rest one piece of each long message in turn, each once the connection has taken
    the previous one (`drain`): the transport then never holds more than about a piece, and a short
    message written meanwhile goes out right after it."""

    def __init__(self, frames: _Frames):
        self.frames = frames
        self._long: deque[_LongMessage] = deque()
        self._pieces: asyncio.Task | None = None

    def send(self, kind: _Kind, call_id: int, payload: bytes = b"") -> None:
        if self.frames.is_closing():
            return
        if len(payload) <= PIECE_BYTES:
            self.frames.transport.writelines((_HEADER.pack(len(payload), kind, call_id, len(payload)), payload))
            return
        message = _LongMessage(kind, call_id, memoryview(payload))
        if not self._long:
            self._send_piece(message)
        self._long.append(message)
        if self._pieces is None or self._pieces.done():
            self._pieces = asyncio.get_running_loop().create_task(self._send_pieces())

    def drop(self, call_id: int) -> None:
        """Send no more of a call's long message (its caller stopped waiting; a CANCEL frame tells
        the peer to forget the pieces it has)."""
        self._long = deque(message for message in self._long if message.call_id != call_id)

    def _send_piece(self, message: _LongMessage) -> None:
        piece = message.payload[message.sent:message.sent + PIECE_BYTES]
        message.sent += len(piece)
        flags = message.kind | (0 if message.done else _MORE)
        self.frames.transport.writelines(
            (_HEADER.pack(len(piece), flags, message.call_id, len(message.payload)), piece))

    async def _send_pieces(self) -> None:
        try:
            while self._long:
                await self.frames.drain()
                if not self._long or self.frames.is_closing():
                    break
                message = self._long.popleft()
                self._send_piece(message)
                if not message.done:
                    self._long.append(message)
        except ConnectionError:
            pass  # the connection broke: the calls on it fail as it closes
        finally:
            if self.frames.is_closing():
                self._long.clear()


@dataclass(eq=False)
class _Arriving:
    """A message being received into the buffer it will be read from: how much of it is in."""

    kind: _Kind
    data: bytearray
    filled: int = 0


class _Frames(asyncio.BufferedProtocol):
    """One connection's frames both ways, received by the event loop with no copy it does not need.

    Short frames land in a scratch buffer and are cut out of it, many a read. A long message's bytes
    go from the socket straight into the one buffer the message is then read from (every frame's
    header says how long its whole message is), other messages' frames between its pieces: a
    message of megabytes is not gathered by a stream reader, then joined, then cut out again
    (`asyncio.StreamReader` did all three: a 3 MiB echo took 2.3-3.1 ms under uvloop, as Ray runs
    the replicas and the router, against 1.6-1.8 ms this way; 5.1-5.3 against 1.8-2.3 ms on
    asyncio's own loop).

    `on_frame(kind, call_id, payload)` gets every whole message, a long one as a bytearray;
    a CANCEL frame also forgets the pieces of its call's message received so far. `on_closed(error)`
    is told once when the connection closes (None: the peer closed it). With `token`, the peer must
    first greet with `GREETING` and that token within `GREETING_TIMEOUT_S`, or it is refused
    (`REFUSED`, then closed) before anything it sent is given to `on_frame`."""

    def __init__(self, limit: int, on_frame: Callable[[_Kind, int, bytes | bytearray], None],
                 on_closed: Callable[[Exception | None], None], *, token: bytes | None = None):
        self.limit = limit
        self.on_frame = on_frame
        self.on_closed = on_closed
        self.token = token
        self.transport: asyncio.Transport | None = None
        self.out = _Outgoing(self)
        self._scratch = bytearray(SCRATCH_BYTES)
        self._view = memoryview(self._scratch)
        self._start = self._end = 0  # the bytes received and not yet parsed: _scratch[_start:_end]
        self._partial: dict[int, _Arriving] = {}  # long messages by call id, some of their pieces in
        self._into: tuple[int, _Arriving, int, bool] | None = None  # a piece coming straight into its message:
        # call id, message, where the piece ends in it, whether it is the message's last
        self._awaiting_greeting = token is not None
        self._greeting_overdue: asyncio.TimerHandle | None = None
        self._paused = False
        self._drains: list[asyncio.Future] = []
        self._error: Exception | None = None

    # -- asyncio's side --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        _tune(transport)
        if self.token is not None:
            self._greeting_overdue = asyncio.get_running_loop().call_later(
                GREETING_TIMEOUT_S, self._refuse, "no greeting in time")

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._into is not None:
            _, message, end, _ = self._into
            return memoryview(message.data)[message.filled:end]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._scratch) - self._end < _HEADER.size + STRAIGHT_IN_BYTES:  # room for a short frame whole
            kept = self._end - self._start
            self._view[:kept] = self._view[self._start:self._end]
            self._start, self._end = 0, kept
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._into is None:
                self._end += nbytes
            else:
                call_id, message, end, last = self._into
                message.filled += nbytes
                if message.filled < end:
                    return
                self._into = None
                self._piece_in(call_id, message, last)
            self._parse()
        except _ProtocolError as error:
            log.warning("direct channel: closing a connection that broke the framing: %s", error)
            self._error = error
            self.transport.close()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drains(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._greeting_overdue is not None:
            self._greeting_overdue.cancel()
        self._partial.clear()
        self._into = None
        self._wake_drains(ConnectionResetError("the connection closed"))
        self.on_closed(self._error or exc)

    # -- ours ------------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def drain(self) -> None:
        """Once the transport holds little enough unsent (asyncio's write flow control)."""
        if self.is_closing():
            raise ConnectionResetError("the connection is closing")
        if self._paused:
            drained = asyncio.get_running_loop().create_future()
            self._drains.append(drained)
            await drained

    def _wake_drains(self, error: Exception | None) -> None:
        drains, self._drains = self._drains, []
        for drained in drains:
            if not drained.done():
                drained.set_result(None) if error is None else drained.set_exception(error)

    def _parse(self) -> None:
        while not self.transport.is_closing():
            if self._awaiting_greeting and not self._greeted():
                return
            if self._end - self._start < _HEADER.size:
                return
            size, flags, call_id, total = _HEADER.unpack_from(self._scratch, self._start)
            kind, more, message = self._frame_of(size, flags, call_id, total)
            body = self._start + _HEADER.size
            arrived = min(self._end - body, size)
            if message is None and not more:  # a message in one frame
                if arrived == size:
                    self._start = body + size
                    self.on_frame(kind, call_id, bytes(self._view[body:body + size]))
                    continue
                if size <= STRAIGHT_IN_BYTES:
                    return  # the rest comes into the scratch buffer
            if message is None:
                message = _Arriving(kind, bytearray(total))
            end = message.filled + size
            message.data[message.filled:message.filled + arrived] = self._view[body:body + arrived]
            message.filled += arrived
            self._start = body + arrived
            if message.filled < end:  # the rest of the piece straight into the message
                self._into = (call_id, message, end, not more)
                return
            self._piece_in(call_id, message, not more)

    def _frame_of(self, size: int, flags: int, call_id: int, total: int) -> tuple[_Kind, bool, _Arriving | None]:
        """The frame's kind, whether more of its message follows, and the message it continues."""
        if total > self.limit:
            raise _ProtocolError(f"a message of {total} bytes, over the channel's bound of {self.limit}")
        try:
            kind = _Kind(flags & ~_MORE)
        except ValueError:
            raise _ProtocolError(f"a frame of unknown kind {flags}") from None
        more = bool(flags & _MORE)
        if kind == _Kind.CANCEL:
            self._partial.pop(call_id, None)  # what arrived of the call's message is forgotten
            if size or more:
                raise _ProtocolError(f"a cancel frame of {size} bytes")
            return kind, False, None
        message = self._partial.get(call_id)
        if message is not None and (message.kind != kind or len(message.data) != total):
            raise _ProtocolError(f"a piece of a {kind.name} message of {total} bytes continuing a "
                                 f"{message.kind.name} message of {len(message.data)}")
        filled = 0 if message is None else message.filled
        if filled + size > total or more == (filled + size == total):
            raise _ProtocolError(f"a piece of {size} bytes at {filled} of a {total}-byte message, "
                                 f"{'more' if more else 'nothing more'} to follow")
        return kind, more, message

    def _piece_in(self, call_id: int, message: _Arriving, last: bool) -> None:
        if last:
            self._partial.pop(call_id, None)
            self.on_frame(message.kind, call_id, message.data)
        else:
            self._partial[call_id] = message

    def _greeted(self) -> bool:
        """Whether the peer has greeted with the token (the greeting's bytes consumed); refused at
        the first byte that cannot be the greeting."""
        opening = self._view[self._start:self._end]
        known = min(len(opening), len(GREETING))
        if opening[:known] != GREETING[:known]:
            self._refuse("not a direct channel greeting")
            return False
        if len(opening) <= len(GREETING) or len(opening) < len(GREETING) + 1 + opening[len(GREETING)]:
            return False
        length = opening[len(GREETING)]
        token = bytes(opening[len(GREETING) + 1:len(GREETING) + 1 + length])
        if not hmac.compare_digest(token, self.token):
            self._refuse("a wrong token")
            return False
        self._start += len(GREETING) + 1 + length
        self._awaiting_greeting = False
        self._greeting_overdue.cancel()
        return True

    def _refuse(self, why: str) -> None:
        log.debug("direct channel: refusing a connection (%s)", why)
        self.out.send(_Kind.REFUSED, 0, "a connection without this replica's token".encode())
        self.transport.close()


def _tune(transport: asyncio.BaseTransport) -> None:
    """Probe the connection while it is idle (`KEEPALIVE_IDLE_S`), give it up when what was sent
    stays unacknowledged (`UNACKNOWLEDGED_TIMEOUT_S`), and keep at most about a piece unsent in the
    kernel (`PIECE_BYTES`), where the platform lets us."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, PIECE_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                          ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, option):  # Linux; macOS names the first TCP_KEEPALIVE
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, UNACKNOWLEDGED_TIMEOUT_S * 1000)


async def _raise(error: Exception) -> Any:
    raise error


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class Route:
    """Where a session's calls to one tier go: the endpoint of the replica that holds it, once a
    call through Serve has placed it there (None: through Serve, by the session's affinity)."""

    session_id: str
    endpoint: Endpoint | None = None


class _Link:
    """One router connection as the replica sees it: its frames, and the calls it is answering, by
    call id. Nothing it sends is unpickled before it has greeted with the replica's token."""

    def __init__(self, server: DirectServer):
        self.server = server
        self.calls: dict[int, asyncio.Task] = {}
        self.gone = asyncio.Event()  # the connection has closed
        self.frames = _Frames(server.message_bytes, self._frame, self._closed, token=server._token.encode())
        self.out = self.frames.out
        server._links.add(self)

    def _frame(self, kind: _Kind, call_id: int, payload: bytes | bytearray) -> None:
        if kind == _Kind.CALL:
            task = asyncio.get_running_loop().create_task(self.server._answer(self.out, call_id, payload))
            self.calls[call_id] = task
            task.add_done_callback(lambda _, call_id=call_id: self.calls.pop(call_id, None))
        elif kind == _Kind.CANCEL:
            if call_id in self.calls:
                # After the call's first step, not before: a CANCEL read in the same chunk as its
                # CALL would otherwise stop the task before its method ever ran, and a tier applies
                # the tokens a call carries in that first step (the router counts a call written as
                # applied: `wire.SentTokens`; one that is not makes the session's next call be
                # refused and sent again whole). The task's first step is already queued; this
                # runs after it.
                asyncio.get_running_loop().call_soon(self.calls[call_id].cancel)
        else:
            raise _ProtocolError(f"a frame of kind {kind.name} from the router")

    def _closed(self, error: Exception | None) -> None:
        for task in self.calls.values():  # the router went away: nobody reads these answers
            task.cancel()
        self.server._links.discard(self)
        self.gone.set()


class DirectServer:
    """A tier replica's side: a TCP server on the replica's event loop (the one its calls and its
    batcher run on), answering `METHODS` of `target`. Started by the first call that asks for its
    endpoint."""

    def __init__(self, target: object, *, host: str | None = None, message_bytes: int):
        self.methods: dict[str, Callable[..., Awaitable[Any]]] = {
            name: getattr(target, name) for name in METHODS if hasattr(target, name)}
        self.host = host
        self.message_bytes = message_bytes
        self._started: asyncio.Task | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._token = secrets.token_urlsafe(24)
        self.calls = 0  # answered here rather than through Serve

    async def endpoint(self) -> Endpoint:
        """The server's address and token, starting it on the running loop the first time."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start())
        return await asyncio.shield(self._started)

    async def _start(self) -> Endpoint:
        host = self.host or _node_address()
        server = await asyncio.get_running_loop().create_server(lambda: _Link(self).frames, host, 0)
        self._server = server
        port = server.sockets[0].getsockname()[1]
        address = host if ":" not in host else f"[{host}]"  # IPv6
        endpoint = Endpoint(f"{address}:{port}", self._token)
        log.info("direct channel open at %s (%s)", endpoint, ", ".join(self.methods))
        return endpoint

    async def _answer(self, out: _Outgoing, call_id: int, payload: bytes | bytearray) -> None:
        self.calls += 1
        try:
            name = payload[1:1 + payload[0]].decode("ascii", errors="replace")
            method = self.methods.get(name)
            if method is None:
                out.send(_Kind.UNAVAILABLE, call_id, f"this replica has no method {name!r}".encode())
                return
            value = await method(*_loads(payload, 1 + payload[0]))
        except asyncio.CancelledError as cancelled:
            if asyncio.current_task().cancelling():
                raise  # the caller stopped waiting, or its connection closed
            out.send(_Kind.CANCELLED, call_id, (str(cancelled) or "the tier cancelled the call").encode())
            return
        except Exception as error:  # the tier's own error (or arguments it could not unpickle), for the caller
            out.send(_Kind.ERROR, call_id, _dumps(_portable(error)))
            return
        try:
            answer = _dumps(value)
        except Exception as error:
            out.send(_Kind.UNAVAILABLE, call_id, f"its answer cannot be pickled ({error!r})".encode())
            return
        if len(answer) > self.message_bytes:
            out.send(_Kind.UNAVAILABLE, call_id,
                     f"its answer of {len(answer)} bytes is over the channel's bound of {self.message_bytes}".encode())
            return
        out.send(_Kind.RESULT, call_id, answer)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop listening; give the calls in progress `grace_s` seconds (None: no limit) to be
        answered, then cancel them and close every connection."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        running = [task for link in self._links for task in link.calls.values()]
        if running and grace_s != 0:
            await asyncio.wait(running, timeout=grace_s)
        links = list(self._links)
        for link in links:
            for task in link.calls.values():
                task.cancel()
            link.frames.transport.close()  # once what is written has gone out
        if links:
            _, stuck = await asyncio.wait([asyncio.ensure_future(link.gone.wait()) for link in links],
                                          timeout=STOP_FLUSH_S)
            if stuck:  # a peer that stopped reading: what it did not take is dropped
                for link in self._links:
                    link.frames.transport.abort()
                await asyncio.wait(stuck)  # the same waits, done once the aborts are taken
        await server.wait_closed()


def _portable(error: Exception) -> Exception:
    """The error itself if it survives pickling, else a RuntimeError naming it."""
    try:
        _loads(_dumps(error))
        return error
    except Exception:
        return RuntimeError(repr(error))


def _node_address() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


class DirectResponse:
    """One call in flight over the direct channel: awaitable, cancellable (as Serve's responses)."""

    def __init__(self, call: Awaitable[Any]):
        self._task = asyncio.ensure_future(call)
        # A call its caller stopped awaiting (cancelled) may still end in an error, the tier's
        # cancellation included: retrieved here, so that asyncio does not log it as unretrieved.
        self._task.add_done_callback(lambda task: task.cancelled() or task.exception())

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        self._task.cancel()

    def add_done_callback(self, callback: Callable[[asyncio.Task], object]) -> None:
        self._task.add_done_callback(callback)


class _Connection:
    """The router's connection to one replica (at one endpoint): calls in flight by id, answered by
    a task that reads the replica's frames. Once it breaks, every call on it fails as unavailable
    and it is not used again."""

    def __init__(self, endpoint: Endpoint, message_bytes: int, on_lost: Callable[[_Connection], None]):
        self.endpoint = endpoint
        self.message_bytes = message_bytes
        self.on_lost = on_lost
        self.pending: dict[int, tuple[str, asyncio.Future]] = {}
        self._ids = itertools.count(1)
        self._lost: DirectUnavailableError | None = None
        self._opened = asyncio.get_running_loop().create_task(self._open())
        self._opened.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _open(self) -> _Outgoing:
        token = self.endpoint.token.encode()
        if len(token) > MAX_TOKEN_BYTES:
            raise ValueError(f"a direct channel token of {len(token)} bytes (at most {MAX_TOKEN_BYTES})")
        host, port = _host_port(self.endpoint.address)
        frames = _Frames(self.message_bytes, self._frame, self._closed)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await asyncio.get_running_loop().create_connection(lambda: frames, host, port)
        except (OSError, TimeoutError) as error:
            self._lose(f"unreachable ({error!r})")
            raise self._lost from None
        frames.transport.write(GREETING + bytes((len(token),)) + token)
        return frames.out

    def call(self, method: str, args: tuple) -> DirectResponse:
        """The call, in flight. On an open connection it is written at once, before the caller's
        next await: a caller that goes on with other work meanwhile (the decoding loop streaming a
        round while the next block is drafted) has the tier working beside it."""
        try:
            payload = self._payload(method, args)
        except DirectUnavailableError as error:
            return DirectResponse(_raise(error))  # raised where the answer is awaited, as every failure
        opened = self._opened
        if self._lost is None and opened.done() and not opened.cancelled() and opened.exception() is None:
            call_id, answer = self._send(method, payload, opened.result())
            response = DirectResponse(self._await_answer(call_id, answer))
            # Cancelled before its task first ran, the coroutine never sees the cancellation.
            response.add_done_callback(lambda task: task.cancelled() and self._abandon(call_id))
            return response
        return DirectResponse(self._call_once_open(method, payload))

    def _payload(self, method: str, args: tuple) -> bytes:
        if self._lost is not None:
            raise DirectUnavailableError(f"{method} at {self.endpoint}: {self._lost}")
        payload = _dumps(args, prefix=bytes((len(method),)) + method.encode("ascii"))
        if len(payload) > self.message_bytes:
            raise DirectUnavailableError(f"{method} at {self.endpoint}: a call of {len(payload)} bytes is over the "
                                         f"channel's bound of {self.message_bytes}")
        return payload

    async def _call_once_open(self, method: str, payload: bytes) -> Any:
        try:
            out = await asyncio.shield(self._opened)
        except DirectUnavailableError as error:
            raise DirectUnavailableError(f"{method} at {self.endpoint}: {error}") from None
        if self._lost is not None:
            raise DirectUnavailableError(f"{method} at {self.endpoint}: {self._lost}")
        return await self._await_answer(*self._send(method, payload, out))

    def _send(self, method: str, payload: bytes, out: _Outgoing) -> tuple[int, asyncio.Future]:
        """Write the call now: its id, and the future its answer will resolve."""
        call_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self.pending[call_id] = (method, answer)
        out.send(_Kind.CALL, call_id, payload)
        return call_id, answer

    def _abandon(self, call_id: int) -> None:
        """The caller stopped waiting for a call still unanswered (cancelling the caller cancels the
        answer's future too): the tier stops working on it."""
        _, answer = self.pending.pop(call_id, (None, None))
        if answer is not None and (answer.cancelled() or not answer.done()) and self._lost is None:
            out = self._opened.result()
            out.drop(call_id)  # what of a long call is still to go stays here
            out.send(_Kind.CANCEL, call_id)

    async def _await_answer(self, call_id: int, answer: asyncio.Future) -> Any:
        try:
            return await answer  # (a connection that breaks fails it: `_lose`)
        except asyncio.CancelledError:
            self._abandon(call_id)
            raise
        finally:
            self.pending.pop(call_id, None)

    def _frame(self, kind: _Kind, call_id: int, payload: bytes | bytearray) -> None:
        """The replica's answer to a call (or its refusal of the connection)."""
        if kind == _Kind.REFUSED:
            self._lose(f"refused ({payload.decode(errors='replace')}: the replica there is not the one named)")
            self._opened.result().frames.transport.close()
            return
        method, answer = self.pending.get(call_id, ("", None))
        if answer is None or answer.done():
            return  # a call its caller stopped waiting for
        if kind in (_Kind.RESULT, _Kind.ERROR):
            try:
                value = _loads(payload)
            except Exception as error:  # (a class this process lacks): the call goes through Serve
                answer.set_exception(DirectUnavailableError(
                    f"{method} at {self.endpoint}: its answer cannot be unpickled here ({error!r})"))
                return
            if kind == _Kind.RESULT:
                answer.set_result(value)
            else:
                answer.set_exception(value)
        elif kind == _Kind.CANCELLED:
            answer.set_exception(RequestCancelledError(f"{method} at {self.endpoint}: {payload.decode(errors='replace')}"))
        elif kind == _Kind.UNAVAILABLE:
            answer.set_exception(DirectUnavailableError(f"{method} at {self.endpoint}: {payload.decode(errors='replace')}"))
        else:
            raise _ProtocolError(f"a frame of kind {kind.name} from the replica")

    def _closed(self, error: Exception | None) -> None:
        self._lose("the replica closed the connection" if error is None else f"unreachable ({error!r})")

    def _lose(self, reason: str) -> None:
        """The connection is gone: its calls fail as unavailable, and it is forgotten."""
        if self._lost is None:
            self._lost = DirectUnavailableError(reason)
            self.on_lost(self)
        for method, answer in self.pending.values():
            if not answer.done():
                answer.set_exception(DirectUnavailableError(f"{method} at {self.endpoint}: {reason}"))

    async def close(self) -> None:
        self._lose("the router closed its channels")
        if not self._opened.done():
            self._opened.cancel()
        elif not self._opened.cancelled() and self._opened.exception() is None:
            self._opened.result().frames.transport.close()


class DirectChannels:
    """The router's side: one connection per tier replica endpoint, opened on first use."""

    def __init__(self, *, message_bytes: int):
        self.message_bytes = message_bytes
        self._connections: dict[Endpoint, _Connection] = {}

    def call(self, endpoint: Endpoint, method: str, *args: Any) -> DirectResponse:
        """`method(*args)` of the replica at `endpoint`. A call the tier cancelled raises Serve's
        `RequestCancelledError`; one that did not get through to the replica (or whose answer could
        not come back) `DirectUnavailableError`, so that it can go through Serve instead."""
        return self._connection(endpoint).call(method, args)

    def _connection(self, endpoint: Endpoint) -> _Connection:
        connection = self._connections.get(endpoint)
        if connection is None:
            connection = _Connection(endpoint, self.message_bytes, self._forget)
            self._connections[endpoint] = connection
        return connection

    def _forget(self, connection: _Connection) -> None:
        if self._connections.get(connection.endpoint) is connection:
            del self._connections[connection.endpoint]

    async def close(self) -> None:
        connections, self._connections = list(self._connections.values()), {}
        await asyncio.gather(*(connection.close() for connection in connections))
