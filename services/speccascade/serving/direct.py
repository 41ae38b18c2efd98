"""The tiers' direct channel: a session's calls straight from the router to the tier replica that
holds its cache, past Serve's request path (`RouterConfig.tier_transport: direct`).

Serve still places every session: its first call to a tier goes through the deployment handle, so
the session-affinity router (`affinity.py`) picks the replica, autoscaling and health decide which
replicas exist, and a replica that is gone is never chosen. The answer names the replica's own
gRPC endpoint, and the session's later calls to that tier (drafts or verifies, the progress
question of a call that waits long, the release) go there over one long-lived channel per replica.
When the replica cannot be reached (it died, or stopped after a scale-down), the call fails over to
Serve, which places the session again; the new replica recomputes it (`needs_context`), as after
any move.

Why: a call through Serve's handle crosses the handle's routing loop, the replica's request loop and
its user-code thread, with Serve's request bookkeeping at each end. On two shared cores the two
calls of a lossless round took 8.3 ms through Serve and take 4.8 ms here (a bare gRPC call between
idle processes: 0.31 ms; BENCHMARKS.md, serving).

The payloads are the same call and reply objects as over Serve (numpy arrays and small dataclasses),
pickled: the channel runs between the application's own processes inside the Ray cluster. Each
replica draws a random token when it opens its channel and tells it only in answers through Serve;
a call without it is refused before anything in it is unpickled, so reaching the port is not enough
to have the replica unpickle a payload (a replica restarted at the same address has a new token:
the router's old one is refused, and the session is placed again). A tier's exception travels back
as itself; a call the tier ends as cancelled (its session was released or superseded) ends as Serve's
`RequestCancelledError`, as over the handle.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from ray.serve.exceptions import RequestCancelledError

from .wire import Endpoint

log = logging.getLogger(__name__)

SERVICE = "speccascade.TierDirect"
TOKEN_METADATA = "speccascade-direct-token"
METHODS = ("draft", "verify", "release", "progress")
CONNECT_TIMEOUT_MS = 2000  # a replica's port that does not answer (gone, or closed by a firewall) fails this soon
UNREACHABLE_COOLDOWN_S = 60.0  # an endpoint found unreachable is not bound to again for this long


def _dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _message_options(message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", message_bytes), ("grpc.max_receive_message_length", message_bytes)]


class DirectUnavailableError(ConnectionError):
    """The replica at a session's endpoint could not be reached; the call goes through Serve."""


@dataclass
class Route:
    """Where a session's calls to one tier go: the endpoint of the replica that holds it, once a
    call through Serve has placed it there (None: through Serve, by the session's affinity)."""

    session_id: str
    endpoint: Endpoint | None = None


class DirectServer:
    """A tier replica's side: a gRPC server on the replica's event loop (the one its calls and its
    batcher run on), answering `METHODS` of `target`. Started by the first call that asks for its
    endpoint."""

    def __init__(self, target: object, *, host: str | None = None, message_bytes: int):
        self.methods: dict[str, Callable[[Any], Awaitable[Any]]] = {
            name: getattr(target, name) for name in METHODS if hasattr(target, name)}
        self.host = host
        self.message_bytes = message_bytes
        self._started: asyncio.Task | None = None
        self._server: grpc.aio.Server | None = None
        self._token = secrets.token_urlsafe(24)
        self.calls = 0  # answered here rather than through Serve

    async def endpoint(self) -> Endpoint:
        """The server's address and token, starting it on the running loop the first time."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start())
        return await asyncio.shield(self._started)

    async def _start(self) -> Endpoint:
        host = self.host or _node_address()
        server = grpc.aio.server(options=_message_options(self.message_bytes))
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._handler(method))
                    for name, method in self.methods.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        address = host if ":" not in host else f"[{host}]"  # IPv6
        port = server.add_insecure_port(f"{address}:0")
        await server.start()
        self._server = server
        endpoint = Endpoint(f"{address}:{port}", self._token)
        log.info("direct channel open at %s (%s)", endpoint, ", ".join(self.methods))
        return endpoint

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        token = dict(context.invocation_metadata() or ()).get(TOKEN_METADATA, "")
        return hmac.compare_digest(token.encode(), self._token.encode())

    def _handler(self, method: Callable[[Any], Awaitable[Any]]):
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if not self._authorized(context):  # before anything is unpickled
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "a direct call without this replica's token")
            self.calls += 1
            try:
                value = await method(*pickle.loads(request))
            except asyncio.CancelledError as cancelled:
                if asyncio.current_task().cancelling():
                    raise  # the caller went away: gRPC ends the call
                await context.abort(grpc.StatusCode.CANCELLED, str(cancelled) or "the tier cancelled the call")
            except Exception as error:  # the tier's own error, for the caller to raise
                return _dumps((False, _portable(error)))
            return _dumps((True, value))

        return handle

    async def stop(self, grace_s: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


def _portable(error: Exception) -> Exception:
    """The error itself if it survives pickling, else a RuntimeError naming it."""
    try:
        pickle.loads(_dumps(error))
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


@dataclass
class _Channel:
    channel: grpc.aio.Channel
    stubs: dict[str, Any]
    active: int = 0  # calls in flight on it
    forgotten: bool = False  # closed once its last call in flight ends


class DirectChannels:
    """The router's side: one channel per tier replica address, opened on first use."""

    def __init__(self, *, message_bytes: int):
        self.message_bytes = message_bytes
        self._channels: dict[str, _Channel] = {}  # by address
        self._closing: set[asyncio.Task] = set()

    def call(self, endpoint: Endpoint, method: str, *args: Any) -> DirectResponse:
        """`method(*args)` of the replica at `endpoint`. A call the tier cancelled raises Serve's
        `RequestCancelledError`; one that did not get through to the replica (or whose answer did
        not come back) `DirectUnavailableError`, so that it can go through Serve instead."""
        return DirectResponse(self._call(endpoint, method, args))

    async def _call(self, endpoint: Endpoint, method: str, args: tuple) -> Any:
        entry = self._entry(endpoint.address)
        if method not in entry.stubs:
            entry.stubs[method] = entry.channel.unary_unary(f"/{SERVICE}/{method}")
        entry.active += 1
        try:
            answer = await entry.stubs[method](_dumps(args), metadata=((TOKEN_METADATA, endpoint.token),))
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.CANCELLED:
                raise RequestCancelledError(f"{method} at {endpoint}: {error.details()}") from None
            # Gone or going; or no longer our replica at that address: another process (a restarted
            # replica does not know the old token; something else does not serve our methods).
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.UNIMPLEMENTED):
                self.forget(endpoint.address)
            raise DirectUnavailableError(f"{method} at {endpoint}: {code.name} ({error.details()})") from None
        finally:
            entry.active -= 1
            if entry.forgotten and not entry.active:
                self._close_later(entry)
        ok, value = pickle.loads(answer)
        if not ok:
            raise value
        return value

    def _entry(self, address: str) -> _Channel:
        if address not in self._channels:
            # gRPC waits 20 s for a connection by default; the router would rather place the session again.
            options = [*_message_options(self.message_bytes), ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS)]
            self._channels[address] = _Channel(grpc.aio.insecure_channel(address, options=options), {})
        return self._channels[address]

    def forget(self, address: str) -> None:
        """Stop using the channel to a replica found unreachable (a later session placed at the
        same address opens a new one); it closes once the calls still on it have ended, so that
        closing it never cancels another session's call."""
        entry = self._channels.pop(address, None)
        if entry is not None:
            entry.forgotten = True
            if not entry.active:
                self._close_later(entry)

    def _close_later(self, entry: _Channel) -> None:
        task = asyncio.get_running_loop().create_task(entry.channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(entry.channel.close() for entry in channels), *self._closing)
