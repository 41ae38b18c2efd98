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
its user-code thread, with Serve's request bookkeeping at each end — on two shared cores ~4 ms a
call against ~0.5 ms for a plain gRPC call (BENCHMARKS.md, serving), and a lossless round makes two.

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

log = logging.getLogger(__name__)

SERVICE = "speccascade.TierDirect"
TOKEN_METADATA = "speccascade-direct-token"
METHODS = ("draft", "verify", "release", "progress")
CONNECT_TIMEOUT_MS = 2000  # a replica's port that does not answer (gone, or closed by a firewall) fails this soon
UNREACHABLE_COOLDOWN_S = 60.0  # an endpoint found unreachable is not bound to again for this long
CLOSE_GRACE_S = 5.0  # calls still on a channel to a replica found unreachable get this long to end


def _dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _message_options(message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", message_bytes), ("grpc.max_receive_message_length", message_bytes)]


class DirectUnavailableError(ConnectionError):
    """The replica at a session's endpoint could not be reached; the call goes through Serve."""


@dataclass(frozen=True)
class Endpoint:
    """A tier replica's direct channel: its address, and the token every call to it carries."""

    address: str  # host:port
    token: str

    def __str__(self) -> str:
        return self.address


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

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        self._task.cancel()


class DirectChannels:
    """The router's side: one channel per tier replica endpoint, opened on first use."""

    def __init__(self, *, message_bytes: int):
        self.message_bytes = message_bytes
        self._channels: dict[str, tuple[grpc.aio.Channel, dict[str, Any]]] = {}  # by address
        self._closing: set[asyncio.Task] = set()

    def call(self, endpoint: Endpoint, method: str, *args: Any) -> DirectResponse:
        """`method(*args)` of the replica at `endpoint`."""
        return DirectResponse(self._call(endpoint, method, args))

    async def _call(self, endpoint: Endpoint, method: str, args: tuple) -> Any:
        stub = self._stub(endpoint.address, method)
        try:
            answer = await stub(_dumps(args), metadata=((TOKEN_METADATA, endpoint.token),))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED:
                raise RequestCancelledError(f"{method} at {endpoint}: {error.details()}") from None
            # Gone or going; or another process at its address now (a restarted replica), which
            # does not know the token.
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED):
                self.forget(endpoint.address)
                raise DirectUnavailableError(f"{method} at {endpoint}: {error.code().name} "
                                             f"({error.details()})") from None
            raise
        ok, value = pickle.loads(answer)
        if not ok:
            raise value
        return value

    def _stub(self, address: str, method: str):
        if address not in self._channels:
            # gRPC waits 20 s for a connection by default; the router would rather place the session again.
            options = [*_message_options(self.message_bytes), ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS)]
            channel = grpc.aio.insecure_channel(address, options=options)
            self._channels[address] = (channel, {})
        channel, stubs = self._channels[address]
        if method not in stubs:
            stubs[method] = channel.unary_unary(f"/{SERVICE}/{method}")
        return stubs[method]

    def forget(self, address: str) -> None:
        """Close the channel to a replica found unreachable, in the background (a later session
        placed at the same address opens a new one)."""
        entry = self._channels.pop(address, None)
        if entry is not None:
            task = asyncio.get_running_loop().create_task(entry[0].close(CLOSE_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(channel.close() for channel, _ in channels), *self._closing)
