"""Session affinity for tier calls: a Ray Serve request router that sends every call of a session
to the same replica, the one holding the session's KV cache.

The router tags each tier call with the session id (`handle.options(multiplexed_model_id=...)`).
Replicas are ranked by rendezvous (highest-random-weight) hashing of (session id, replica id):
a session always prefers the same replica while it lives, and when replicas come or go only the
sessions of those replicas move. Lower ranks are the fallback when the preferred replica is full;
a call that lands elsewhere is still answered correctly, by recomputing.

Operations calls can name a replica instead of a session (`pinned_to(replica_id)`), to read every
replica's statistics in turn; a pin to a replica that is gone goes to any replica (the answer says
which one answered).

Serve indexes every request it routes under its multiplexed id and drops an entry only when a later
request with the same id is matched; a session's id never comes again once it ends, so the entries
of its calls, and the arguments they hold (a verify call carries the drafted block, whole
probability rows included), stayed referenced for the life of the router process (~20 MB a request
of the opt rule with unfiltered sampling; Ray Serve 2.60). The router drops the entries of requests
already routed (`forget_routed`) as each request completes: Serve calls `on_request_completed` once
for every request it dispatched, whatever its outcome.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

REPLICA_PIN_PREFIX = "replica:"  # session ids are "<tenant id or ->/<uuid>"; tenant ids have no ":"


def pinned_to(replica_id: str) -> str:
    """The `multiplexed_model_id` that routes a call to the replica with this unique id."""
    return REPLICA_PIN_PREFIX + replica_id


def affinity_score(session_id: str, replica_key: str) -> int:
    digest = hashlib.blake2b(f"{session_id}|{replica_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def forget_routed(index: dict[str, Iterable[PendingRequest]]) -> int:
    """Drop, from Serve's index of pending requests by multiplexed id, every id whose requests have
    all been routed (their futures done); the ids dropped."""
    routed = [model_id for model_id, pending in index.items() if all(pr.future.done() for pr in pending)]
    for model_id in routed:
        del index[model_id]
    return len(routed)


def rank_by_affinity(session_id: str, replica_keys: list[str]) -> list[str]:
    """Replica keys, most preferred first, for this session."""
    return sorted(replica_keys, key=lambda key: affinity_score(session_id, key), reverse=True)


class SessionAffinityRouter(RequestRouter):
    def _forget_routed(self) -> None:
        index = getattr(self, "_pending_requests_by_model_id", None)  # Serve's MultiplexMixin
        if index:
            forget_routed(index)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._forget_routed()

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        if pending_request is not None:
            # Back off between routing attempts when every ranked replica is full.
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        session_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not session_id:
            # Calls without a session (health, cache stats): any replica.
            return [random.sample(candidate_replicas, len(candidate_replicas))]
        by_key = {r.replica_id.unique_id: r for r in candidate_replicas}
        if session_id.startswith(REPLICA_PIN_PREFIX):
            pinned = by_key.get(session_id.removeprefix(REPLICA_PIN_PREFIX))
            return [[pinned]] if pinned else [random.sample(candidate_replicas, len(candidate_replicas))]
        ranked = rank_by_affinity(session_id, list(by_key))
        ranks = [[by_key[ranked[0]]], [by_key[key] for key in ranked[1:]]]
        return [rank for rank in ranks if rank]
