"""Replica-side pieces without a cluster: LRU session caches, batched scoring, affinity ranking."""

from __future__ import annotations

import torch

from speccascade.engine.runner import ModelRunner
from speccascade.tiers.affinity import rank_by_affinity
from speccascade.tiers.batched_forward import ScoreJob, distributions_batch
from speccascade.tiers.sessions import MIB, SessionStore

from ..conftest import tiny_qwen2

VOCAB = 1000


def runner() -> ModelRunner:
    return ModelRunner(tiny_qwen2(VOCAB, seed=0), name="tiny")


def random_tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_lru_eviction_keeps_the_budget_and_the_sessions_in_use():
    model = runner()
    store = SessionStore(model, budget_mb=1)
    for i in range(6):
        model.distributions(store.get(f"s{i}"), random_tokens(i, 200), 1)
    per_session = store.get("s5").nbytes()
    assert per_session > 0
    store.evict_to_budget(keep=frozenset({"s0"}))
    stats = store.stats()
    assert stats.nbytes <= MIB or stats.sessions == 1
    assert "s0" in store._sessions and "s5" in store._sessions  # in use / most recent survive
    assert stats.evictions == 6 - stats.sessions
    assert store.release("s5") and not store.release("s5")


def test_batched_scoring_equals_one_session_at_a_time():
    model = runner()
    sequences = [random_tokens(i, n) for i, n in enumerate((5, 17, 9, 30))]
    alone = [model.new_session() for _ in sequences]
    batched = [model.new_session() for _ in sequences]
    # Different cache states: two sessions warm, two fresh; all share no prefix with each other.
    for session, tokens in list(zip(alone, sequences)) + list(zip(batched[:2], sequences[:2])):
        model.distributions(session, tokens[: len(tokens) // 2], 1)
    for step in range(3):
        starts = [max(1, len(t) - 3) for t in sequences]
        expected = [model.distributions(s, t, st) for s, t, st in zip(alone, sequences, starts)]
        got = distributions_batch(model, [ScoreJob(s, t, st) for s, t, st in zip(batched, sequences, starts)])
        for e, g in zip(expected, got):
            assert e.shape == g.shape
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
        assert [s.tokens for s in batched] == [s.tokens for s in alone]
        sequences = [t + random_tokens(100 * step + i, k) for i, (t, k) in enumerate(zip(sequences, (1, 3, 2, 1)))]


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
    from speccascade.tiers.metrics import WindowCounters

    window = WindowCounters()
    window.rounds, window.deferred_positions, window.expert_service_seconds = 3, 5, 0.25
    taken = window.take()
    assert (taken.rounds, taken.deferred_positions, taken.expert_service_seconds) == (3, 5, 0.25)
    assert window.rounds == 0 and window.deferred_positions == 0 and window.expert_service_seconds == 0.0
    assert taken.as_dict()["window_seconds"] >= 0
