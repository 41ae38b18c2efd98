"""Per-replica KV caches, one per session, evicted least-recently-used under a memory budget.

Only an optimisation: every tier call carries the whole token sequence, so a session that is
missing here (another replica answered before, evicted, restarted) is recomputed from scratch.
The caches themselves belong to the replica's model backend; this store keys them by session id.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..engine.backends import BackendSession, ModelBackend

MIB = 1 << 20


@dataclass(frozen=True)
class CacheStats:
    sessions: int
    nbytes: int
    evictions: int
    misses: int  # calls for a session this replica did not hold (first call or recompute)


class SessionStore:
    def __init__(self, backend: ModelBackend, *, budget_mb: int):
        self.backend = backend
        self.budget_bytes = budget_mb * MIB
        self._sessions: OrderedDict[str, BackendSession] = OrderedDict()
        self.evictions = 0
        self.misses = 0

    def get(self, session_id: str) -> BackendSession:
        """The session's cache, most recently used now; a fresh one if this replica has none."""
        session = self._sessions.get(session_id)
        if session is None:
            session = self.backend.new_session()
            self._sessions[session_id] = session
            self.misses += 1
        self._sessions.move_to_end(session_id)
        return session

    def release(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        self.backend.release(session)
        return True

    def _bytes(self, session: BackendSession) -> int:
        return self.backend.session_bytes(session)

    def evict_to_budget(self, keep: frozenset[str] = frozenset()) -> None:
        """Drop least-recently-used sessions (other than `keep`) until the caches fit the budget."""
        total = sum(self._bytes(s) for s in self._sessions.values())
        for session_id in list(self._sessions):
            if total <= self.budget_bytes:
                break
            if session_id in keep:
                continue
            session = self._sessions.pop(session_id)
            total -= self._bytes(session)
            self.backend.release(session)
            self.evictions += 1

    def tenants(self) -> dict[str, int]:
        """Cached sessions per tenant (a session id starts with its tenant's id, see Router.stream)."""
        counts: dict[str, int] = {}
        for session_id in self._sessions:
            tenant = session_id.split("/", 1)[0]
            counts[tenant] = counts.get(tenant, 0) + 1
        return counts

    def stats(self) -> CacheStats:
        return CacheStats(
            sessions=len(self._sessions), nbytes=sum(self._bytes(s) for s in self._sessions.values()),
            evictions=self.evictions, misses=self.misses,
        )
