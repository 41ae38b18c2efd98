"""speccascade's log lines inside a Ray Serve replica.

Serve writes a replica's log file through handlers on its own logger, `ray.serve`, which does not
propagate; records of other loggers reach only the root logger, which shows nothing below WARNING.
So a tier's or the router's INFO lines (a cancelled request, reclaimed caches) would be lost.
`log_to_replica_file()`, called in each deployment's constructor, hands the `speccascade` loggers
to Serve's handlers: same file, same format, with the request id of the call being served.
"""

from __future__ import annotations

import logging

SERVE_LOGGER = "ray.serve"  # ray.serve._private.constants.SERVE_LOGGER_NAME
PACKAGE_LOGGER = "speccascade"


def log_to_replica_file(level: int = logging.INFO) -> None:
    """In a Serve replica, send `speccascade.*` records at `level` and above to the replica's log
    handlers (instead of the root logger's). Outside one (no Serve handlers yet), nothing changes.
    Idempotent."""
    handlers = logging.getLogger(SERVE_LOGGER).handlers
    if not handlers:
        return
    package = logging.getLogger(PACKAGE_LOGGER)
    for handler in handlers:
        if handler not in package.handlers:
            package.addHandler(handler)
    package.setLevel(level)
    package.propagate = False
