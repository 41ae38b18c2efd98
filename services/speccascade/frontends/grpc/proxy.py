"""What speccascade runs inside Ray Serve's gRPC proxy: the API's servicer registration, and
one-line logging there of clients that hang up.

A client that cancels a call, or whose deadline passes, is normal. Serve's proxy (Ray 2.60) still
logs it with a traceback in two ways, although nothing failed:

- The client goes away while the proxy awaits the router's next message. The proxy cancels the
  request but leaves its own awaiting task to end in `RequestCancelledError`, which asyncio then
  reports as "Task exception was never retrieved" with a traceback. (Ray added a callback that
  swallows this on its HTTP-disconnect and timeout paths, ray-project/ray#52423, not on this one.)
  The proxy's access log already has the request's CANCELLED line.
- The client goes away while the proxy is between two messages of a stream. The proxy's response
  generator is closed, catches the `GeneratorExit` as an error and logs "Request failed due to
  unexpected error." with a traceback, and no access-log line; having caught it, the generator
  yields again, and the task closing it ends in "async generator ignored GeneratorExit", which
  asyncio reports as another unretrieved task exception.

Serve calls the functions in `grpc_options.grpc_servicer_functions` inside the proxy process, on its
event loop, so `add_SpecCascadeServicer_to_server` below installs there an asyncio exception handler
that drops the two unretrieved-task reports and a filter on Serve's logger that turns the
"Request failed" record into one line: one line per hung-up client in all. Every other error
keeps its traceback.
"""

from __future__ import annotations

import asyncio
import logging

from ...api.v1 import speccascade_pb2_grpc
from ...serving.logs import SERVE_LOGGER

CLIENT_GONE_MESSAGE = "client went away mid-stream (cancelled or deadline passed): CANCELLED"

log = logging.getLogger(SERVE_LOGGER)


IGNORED_GENERATOR_EXIT = "async generator ignored GeneratorExit"  # CPython's message


def is_client_gone_aftermath(exception: BaseException | None) -> bool:
    """An unretrieved task exception that only says the proxy's client went away."""
    from ray.serve.exceptions import RequestCancelledError

    return isinstance(exception, RequestCancelledError) or (
        type(exception) is RuntimeError and str(exception) == IGNORED_GENERATOR_EXIT)


class ClientGoneFilter(logging.Filter):
    """Rewrites Serve's "Request failed" record for a stream closed by its client (a `GeneratorExit`
    traceback) into one INFO line without the traceback; passes every other record unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exception = record.exc_info[1] if record.exc_info else None
        if isinstance(exception, GeneratorExit):
            record.msg, record.args = CLIENT_GONE_MESSAGE, ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def client_gone_exception_handler(previous):
    """An asyncio exception handler that drops what a hung-up client leaves behind in the proxy (see
    `is_client_gone_aftermath`) and hands everything else to `previous` (or asyncio's default)."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if is_client_gone_aftermath(context.get("exception")):
            log.debug("after a client went away: %r", context["exception"])
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handle.speccascade_client_gone = True
    return handle


def install_client_gone_logging() -> None:
    """Install the filter and, when called on a running event loop, the exception handler. Idempotent."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, ClientGoneFilter) for f in logger.filters):
        logger.addFilter(ClientGoneFilter())
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not on the proxy's loop: only the filter applies
        return
    previous = loop.get_exception_handler()
    if not getattr(previous, "speccascade_client_gone", False):
        loop.set_exception_handler(client_gone_exception_handler(previous))


def add_SpecCascadeServicer_to_server(servicer, server) -> None:  # noqa: N802 (gRPC's naming)
    """The SpecCascade service's registration for Serve's `grpc_servicer_functions`: the generated
    one, after installing the proxy's client-gone logging."""
    install_client_gone_logging()
    speccascade_pb2_grpc.add_SpecCascadeServicer_to_server(servicer, server)
