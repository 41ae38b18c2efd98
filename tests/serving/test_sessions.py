"""Replica-side pieces without a cluster: LRU session caches, affinity ranking, window counters.
(Batched scoring itself is tested with the backends, tests/engine/test_backends.py.)"""

from __future__ import annotations

import pytest
import torch
from speccascade.engine.backends import BACKEND_KINDS, backend_class
from speccascade.serving.affinity import rank_by_affinity
from speccascade.serving.sessions import MIB, SessionStore

from ..conftest import tiny_qwen2

VOCAB = 1000


def random_tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_lru_eviction_keeps_the_budget_and_the_sessions_in_use(kind):
    model = backend_class(kind)(tiny_qwen2(VOCAB, seed=0), name="tiny")
    store = SessionStore(model, budget_mb=1)
    for i in range(6):
        model.distributions(store.get(f"s{i}"), random_tokens(i, 200), 1)
    per_session = model.session_bytes(store.get("s5"))
    assert per_session > 0
    store.evict_to_budget(keep=frozenset({"s0"}))
    stats = store.stats()
    assert stats.nbytes <= MIB or stats.sessions == 1
    assert "s0" in store and "s5" in store  # in use / most recent survive
    assert stats.evictions == 6 - stats.sessions
    assert store.release("s5") and not store.release("s5")


def test_affinity_keeps_sessions_on_their_replica_when_others_come_and_go():
    replicas = [f"r{i}" for i in range(4)]
    sessions = [f"session-{i}" for i in range(200)]
    before = {s: rank_by_affinity(s, replicas)[0] for s in sessions}
    assert len(set(before.values())) == 4  # spread over every replica
    after = {s: rank_by_affinity(s, replicas[:3])[0] for s in sessions}  # r3 went away
    moved = [s for s in sessions if before[s] != after[s]]
    assert all(before[s] == "r3" for s in moved)
    grown = {s: rank_by_affinity(s, replicas + ["r4"])[0] for s in sessions}  # r4 joined
    assert all(grown[s] in (before[s], "r4") for s in sessions)
    assert any(grown[s] == "r4" for s in sessions)


def test_window_counters_take_returns_the_counts_and_restarts():
    from speccascade.serving.metrics import WindowCounters

    window = WindowCounters()
    window.rounds, window.deferred, window.expert_seconds = 3, 5, 0.25
    taken = window.take()
    assert (taken.rounds, taken.deferred, taken.expert_seconds) == (3, 5, 0.25)
    assert window.rounds == 0 and window.deferred == 0 and window.expert_seconds == 0.0
    assert taken.as_dict()["window_seconds"] >= 0
