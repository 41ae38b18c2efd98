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
"""

from __future__ import annotations

import hashlib
import random
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

REPLICA_PIN_PREFIX = "replica:"  # session ids are "<tenant id or ->/<uuid>"; tenant ids have no ":"


def pinned_to(replica_id: str) -> str:
    """The `multiplexed_model_id` that routes a call to the replica with this unique id."""
    return REPLICA_PIN_PREFIX + replica_id


def affinity_score(session_id: str, replica_key: str) -> int:
    digest = hashlib.blake2b(f"{session_id}|{replica_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_by_affinity(session_id: str, replica_keys: list[str]) -> list[str]:
    """Replica keys, most preferred first, for this session."""
    return sorted(replica_keys, key=lambda key: affinity_score(session_id, key), reverse=True)


class SessionAffinityRouter(RequestRouter):
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
