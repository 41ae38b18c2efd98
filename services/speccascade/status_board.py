"""The live status an operator asks for (`speccascade status`): a small named Ray actor per Serve
application where running parts post what they alone know (each router replica its requests in
flight per tenant, the autoscaling policy its last decision) and where the status command reads it.

Public Ray API only: a named actor in namespace `speccascade`, created by whoever posts first
(`get_if_exists`). It belongs to its creator and goes away with it (a router replica scaled down,
the application deleted); the next post creates it again, so a reader may miss at most one
posting period. Posts are fire-and-forget: visibility never blocks or breaks serving.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

NAMESPACE = "speccascade"
TENANT_LOAD = "tenant-load"  # topic: a router replica's requests in flight per tenant (one post per replica)
PIPELINE = "pipeline"  # topic: a router replica's sessions by pipelining state, and its pre-draft counts
AUTOSCALING = "autoscaling"  # topic: the deferral-aware policy's last decision (one poster)


def board_name(app_name: str) -> str:
    return f"status-board/{app_name}"


class StatusBoard:
    """The actor: the latest post of every (topic, source), with the time it was posted."""

    def __init__(self) -> None:
        self._posts: dict[str, dict[str, tuple[float, dict]]] = {}

    def post(self, topic: str, source: str, record: dict) -> None:
        self._posts.setdefault(topic, {})[source] = (time.time(), record)

    def read(self, topic: str, max_age_s: float | None = None) -> dict[str, tuple[float, dict]]:
        """Posts of `topic` by source, (posted at, record); older than `max_age_s` left out."""
        now = time.time()
        return {source: post for source, post in self._posts.get(topic, {}).items()
                if max_age_s is None or now - post[0] <= max_age_s}


@dataclass(frozen=True)
class Post:
    posted_at: float  # time.time() when posted
    record: dict


class StatusPoster:
    """Posts to an application's board from a running replica or the Serve controller. `post`
    never blocks: it sends and returns; a board found gone on the next post is created again."""

    def __init__(self, app_name: str):
        self.app_name = app_name
        self._board = None
        self._last = None  # the previous post's ObjectRef: tells whether the board was still there

    def _handle(self):
        import ray

        if self._last is not None:
            ready, _ = ray.wait([self._last], timeout=0)
            if ready:
                try:
                    ray.get(ready[0])
                except Exception:  # the board went away with its owner: make a new one
                    self._board = None
        if self._board is None:
            self._board = ray.remote(StatusBoard).options(
                name=board_name(self.app_name), namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
            ).remote()
        return self._board

    def post(self, topic: str, source: str, record: dict) -> None:
        try:
            self._last = self._handle().post.remote(topic, source, record)
        except Exception:  # visibility must never break serving or scaling
            log.warning("could not post %s to the status board of %r", topic, self.app_name, exc_info=True)


def read_posts(app_name: str, topic: str, *, max_age_s: float | None = None, timeout_s: float = 10.0
               ) -> dict[str, Post]:
    """The board's posts of `topic` by source (needs a Ray connection to the cluster); empty when
    nothing was posted yet."""
    import ray

    try:
        board = ray.get_actor(board_name(app_name), namespace=NAMESPACE)
    except ValueError:  # no such actor: nobody posted (yet)
        return {}
    posts = ray.get(board.read.remote(topic, max_age_s), timeout=timeout_s)
    return {source: Post(posted_at, record) for source, (posted_at, record) in posts.items()}
