"""What the SpecCascade servicer registration installs in Serve's gRPC proxy: a hung-up client is
one log line, every other error keeps its traceback. (The served check is in test_cancellation.py.)"""

from __future__ import annotations

import asyncio
import logging
import sys

from ray.serve.exceptions import RequestCancelledError
from speccascade.frontends.grpc.proxy import (
    CLIENT_GONE_MESSAGE,
    ClientGoneFilter,
    client_gone_exception_handler,
    install_client_gone_logging,
)


def record_with(exception: BaseException) -> logging.LogRecord:
    try:
        raise exception
    except BaseException:  # noqa: BLE001 (building a record the way logger.exception does)
        exc_info = sys.exc_info()
    return logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed due to unexpected error.",
                             (), exc_info)


def test_a_stream_closed_by_its_client_becomes_one_info_line():
    record = record_with(GeneratorExit())
    assert ClientGoneFilter().filter(record)
    assert record.levelno == logging.INFO and record.getMessage() == CLIENT_GONE_MESSAGE
    assert record.exc_info is None
    assert "Traceback" not in logging.Formatter().format(record)


def test_a_real_failure_keeps_its_traceback():
    record = record_with(ValueError("boom"))
    assert ClientGoneFilter().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "Traceback" in logging.Formatter().format(record)


def test_the_exception_handler_drops_only_what_a_hung_up_client_leaves_behind():
    seen = []
    handle = client_gone_exception_handler(lambda loop, context: seen.append(context["exception"]))
    loop = asyncio.new_event_loop()
    try:
        handle(loop, {"message": "Task exception was never retrieved", "exception": RequestCancelledError("r1")})
        handle(loop, {"message": "Task exception was never retrieved",
                      "exception": RuntimeError("async generator ignored GeneratorExit")})
        real = RuntimeError("a real bug")
        handle(loop, {"message": "Task exception was never retrieved", "exception": real})
    finally:
        loop.close()
    assert seen == [real]


def test_installing_twice_chains_the_previous_handler_once():
    async def install_and_report():
        loop = asyncio.get_running_loop()
        calls = []
        loop.set_exception_handler(lambda loop, context: calls.append(context["message"]))
        install_client_gone_logging()
        install_client_gone_logging()
        loop.call_exception_handler({"message": "other", "exception": KeyError("x")})
        loop.call_exception_handler({"message": "gone", "exception": RequestCancelledError("r2")})
        return calls

    assert asyncio.run(install_and_report()) == ["other"]
    filters = [f for f in logging.getLogger("ray.serve").filters if isinstance(f, ClientGoneFilter)]
    assert len(filters) == 1
