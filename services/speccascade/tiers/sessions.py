"""Per-replica KV caches, one per session, evicted least-recently-used under a memory budget.

Only an optimisation: every tier call carries the whole token sequence, so a session that is
missing here (another replica answered before, evicted, restarted) is recomputed from scratch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..engine.runner import KVSession, ModelRunner

MIB = 1 << 20


@dataclass(frozen=True)
class CacheStats:
    sessions: int
    nbytes: int
    evictions: int
    misses: int  # calls for a session this replica did not hold (first call or recompute)


class SessionStore:
    def __init__(self, runner: ModelRunner, *, budget_mb: int):
        self.runner = runner
        self.budget_bytes = budget_mb * MIB
        self._sessions: OrderedDict[str, KVSession] = OrderedDict()
        self.evictions = 0
        self.misses = 0

    def get(self, session_id: str) -> KVSession:
        """The session's cache, most recently used now; a fresh one if this replica has none."""
        session = self._sessions.get(session_id)
        if session is None:
            session = self.runner.new_session()
            self._sessions[session_id] = session
            self.misses += 1
        self._sessions.move_to_end(session_id)
        return session

    def release(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def evict_to_budget(self, keep: frozenset[str] = frozenset()) -> None:
        """Drop least-recently-used sessions (other than `keep`) until the caches fit the budget."""
        total = sum(s.nbytes() for s in self._sessions.values())
        for session_id in list(self._sessions):
            if total <= self.budget_bytes:
                break
            if session_id in keep:
                continue
            total -= self._sessions.pop(session_id).nbytes()
            self.evictions += 1

    def stats(self) -> CacheStats:
        return CacheStats(
            sessions=len(self._sessions), nbytes=sum(s.nbytes() for s in self._sessions.values()),
            evictions=self.evictions, misses=self.misses,
        )
