"""Per-replica KV caches, one per session, evicted least-recently-used under a memory budget.

Only an optimisation: a session that is missing here (another replica answered before, evicted,
restarted) is recomputed from scratch. Each entry holds the session's backend cache and its token
sequence as the router described it (`wire.KnownTokens`), so a call needs to carry only what
changed; a call that builds on a sequence this replica does not have asks the router for the whole
of it. The caches themselves belong to the replica's model backend; this store keys them by
session id.

A session's life ends in one of two ways, and no cache may outlive it:

- **Released** by its router when the request finishes or is cancelled. The release `end`s the
  session at once (its queued calls are dropped, a draft in progress stops at its next step) and
  `free`s its cache between forward passes. The id is remembered
  (`ended`) for `idle_timeout_s`: a call for it that arrives after the release — one that was in
  flight when the client hung up, with the release overtaking it on the way, or the next block
  of a draft call the release caught mid-way — is refused (`SessionEndedError`) instead of
  building the cache again, where nothing would ever free it. Nobody waits for such a call's
  answer: its router stopped the request before releasing.
- **Abandoned**: a router replica that dies mid-request never releases. A session untouched for
  `idle_timeout_s` is reclaimed (`reclaim_idle`). This is not an ending: a live request that was
  only slow (a client reading its stream slowly) recomputes on its next call.

Thread-safe: the replica's forward thread uses sessions while its event loop reads statistics.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.backends import BackendSession, ModelBackend
from .wire import KnownTokens

MIB = 1 << 20
MAX_ENDED_REMEMBERED = 100_000  # released ids kept at most (about 10 MB), oldest forgotten first


class SessionEndedError(RuntimeError):
    """A call for a session its router already released: the request is over."""

    def __init__(self, session_id: str):
        super().__init__(f"session {session_id} was already released (its request ended)")
        self.session_id = session_id


@dataclass(frozen=True)
class CacheStats:
    sessions: int
    nbytes: int
    evictions: int
    misses: int  # calls for a session this replica did not hold (first call or recompute)
    released: int = 0  # sessions freed by their router's release
    reclaimed: int = 0  # sessions freed after idle_timeout_s without a call (their router may be gone)
    late_calls: int = 0  # calls refused because their session had already been released
    ended_remembered: int = 0  # released ids currently remembered


@dataclass
class SessionEntry:
    session: BackendSession  # the backend's cache
    touched: float  # clock time of the last call
    known: KnownTokens = field(default_factory=KnownTokens)  # the sequence, as the router sent it


class SessionStore:
    def __init__(self, backend: ModelBackend, *, budget_mb: int, idle_timeout_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.backend = backend
        self.budget_bytes = budget_mb * MIB
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self._sessions: OrderedDict[str, SessionEntry] = OrderedDict()  # least recently used first
        self._ended: OrderedDict[str, float] = OrderedDict()  # session id -> released at, oldest first
        self._lock = threading.Lock()
        self.evictions = 0
        self.misses = 0
        self.released = 0
        self.reclaimed = 0
        self.late_calls = 0

    def get(self, session_id: str) -> BackendSession:
        """The session's cache, most recently used now; a fresh one if this replica has none.
        Raises `SessionEndedError` if the session was released."""
        return self.entry(session_id).session

    def entry(self, session_id: str) -> SessionEntry:
        """The session's entry (cache and known tokens), most recently used now; a fresh one if
        this replica has none. Raises `SessionEndedError` if the session was released."""
        with self._lock:
            if session_id in self._ended:
                self.late_calls += 1
                raise SessionEndedError(session_id)
            entry = self._sessions.get(session_id)
            if entry is None:
                entry = self._sessions[session_id] = SessionEntry(self.backend.new_session(), self.clock())
                self.misses += 1
            else:
                entry.touched = self.clock()
                self._sessions.move_to_end(session_id)
            return entry

    def check_live(self, session_id: str) -> None:
        """Raise `SessionEndedError` (and count a late call) if the session was released."""
        with self._lock:
            if session_id in self._ended:
                self.late_calls += 1
                raise SessionEndedError(session_id)

    def is_ended(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._ended

    def refuse_late(self, session_id: str) -> SessionEndedError:
        """Count a call (or the rest of one) that its session's release overtook; its error."""
        with self._lock:
            self.late_calls += 1
        return SessionEndedError(session_id)

    def end(self, session_id: str) -> None:
        """The session's request is over: refuse its later calls (its cache is freed by `free`)."""
        with self._lock:
            self._ended[session_id] = self.clock()
            self._ended.move_to_end(session_id)
            while len(self._ended) > MAX_ENDED_REMEMBERED:
                self._ended.popitem(last=False)

    def free(self, session_id: str) -> bool:
        """Free an ended session's cache (between forward passes). True if a cache was held."""
        with self._lock:
            entry = self._sessions.pop(session_id, None)
            if entry is None:
                return False
            self.backend.release(entry.session)
            self.released += 1
            return True

    def release(self, session_id: str) -> bool:
        """End the session and free its cache now. True if a cache was held."""
        self.end(session_id)
        return self.free(session_id)

    def reclaim_idle(self) -> int:
        """Free sessions untouched for `idle_timeout_s` and forget ids released longer ago than
        that; returns how many sessions were freed."""
        with self._lock:
            horizon = self.clock() - self.idle_timeout_s
            while self._ended and next(iter(self._ended.values())) < horizon:
                self._ended.popitem(last=False)
            idle = [sid for sid, entry in self._sessions.items() if entry.touched < horizon]
            for session_id in idle:
                self.backend.release(self._sessions.pop(session_id).session)
            self.reclaimed += len(idle)
            return len(idle)

    def _bytes(self, session: BackendSession) -> int:
        return self.backend.session_bytes(session)

    def evict_to_budget(self, keep: frozenset[str] = frozenset()) -> None:
        """Drop least-recently-used sessions (other than `keep`) until the caches fit the budget."""
        with self._lock:
            total = sum(self._bytes(e.session) for e in self._sessions.values())
            for session_id in list(self._sessions):
                if total <= self.budget_bytes:
                    break
                if session_id in keep:
                    continue
                session = self._sessions.pop(session_id).session
                total -= self._bytes(session)
                self.backend.release(session)
                self.evictions += 1

    def live(self) -> list[str]:
        """The sessions held here that have not ended."""
        with self._lock:
            return [session_id for session_id in self._sessions if session_id not in self._ended]

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def tenants(self) -> dict[str, int]:
        """Cached sessions per tenant (a session id starts with its tenant's id, see Router.stream)."""
        counts: dict[str, int] = {}
        with self._lock:
            for session_id in self._sessions:
                tenant = session_id.split("/", 1)[0]
                counts[tenant] = counts.get(tenant, 0) + 1
        return counts

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                sessions=len(self._sessions), nbytes=sum(self._bytes(e.session) for e in self._sessions.values()),
                evictions=self.evictions, misses=self.misses, released=self.released, reclaimed=self.reclaimed,
                late_calls=self.late_calls, ended_remembered=len(self._ended),
            )
