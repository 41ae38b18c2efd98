"""Every model backend against a plain full forward pass: cold, warm, after rollback, batched."""

import threading

import pytest
import torch
from speccascade.engine.backends import BACKEND_KINDS, ModelBackend, backend_class, common_prefix_length

from ..conftest import tiny_qwen2

VOCAB = 300


@pytest.fixture(scope="module", params=BACKEND_KINDS)
def runner(request):
    return backend_class(request.param)(tiny_qwen2(VOCAB, seed=3), name="tiny")


def scratch(runner: ModelBackend, tokens: list[int], start: int) -> torch.Tensor:
    with torch.no_grad():
        logits = runner.model(torch.tensor([tokens])).logits[0]
    return torch.softmax(logits.float(), -1)[start - 1 :]


def seq(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_cold_scoring_equals_a_full_forward(runner):
    tokens = seq(20, 0)
    got = runner.distributions(runner.new_session(), tokens, start=15)
    assert got.shape == (6, VOCAB)
    torch.testing.assert_close(got, scratch(runner, tokens, 15))


def test_scoring_after_rollback_equals_scoring_from_scratch(runner):
    session = runner.new_session()
    prefix = seq(12, 1)
    runner.distributions(session, prefix + seq(6, 2), start=12)  # a rejected block
    block = seq(5, 3)
    got = runner.distributions(session, prefix + block, start=12)
    assert session.cached_length == 17
    torch.testing.assert_close(got, scratch(runner, prefix + block, 12))


def test_prefix_extension_reuses_the_cache_and_stays_exact(runner):
    session = runner.new_session()
    tokens = seq(30, 4)
    runner.distributions(session, tokens[:10], start=10)
    calls = runner.forward_calls
    got = runner.distributions(session, tokens, start=10)  # catch up 20 tokens in one pass
    assert runner.forward_calls == calls + 1
    torch.testing.assert_close(got, scratch(runner, tokens, 10))


def test_next_distribution_at_the_cache_end_needs_no_forward(runner):
    session = runner.new_session()
    tokens = seq(8, 5)
    first = runner.next_distribution(session, tokens)
    calls = runner.forward_calls
    again = runner.next_distribution(session, tokens)
    assert runner.forward_calls == calls
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(first, scratch(runner, tokens, 8)[0])


def test_start_out_of_range_is_refused(runner):
    with pytest.raises(ValueError, match="start=0"):
        runner.distributions(runner.new_session(), [1, 2, 3], start=0)


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2], [1, 2]) == 2


# ---- static equals hf (fp32): batches of sessions at different lengths, rollbacks, reclaimed slots ----

def random_tokens(seed: int, n: int) -> list[int]:
    return seq(n, seed)


@pytest.fixture(scope="module")
def pair_of_backends():
    """The same tiny model behind both backends; the static one with only three slots."""
    model = tiny_qwen2(VOCAB, seed=3)
    return backend_class("hf")(model, name="hf"), backend_class("static")(model, name="static", slots=3, max_len=128)


def assert_same_rows(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def score_both(pair, sessions, sequences, starts):
    from speccascade.engine.backends import ScoreJob

    hf, static = pair
    return [backend.score([ScoreJob(s, t, st) for s, t, st in zip(ss, sequences, starts)])
            for backend, ss in ((hf, sessions[0]), (static, sessions[1]))]


def test_batched_scoring_equals_one_session_at_a_time_and_static_equals_hf(pair_of_backends):
    hf, static = pair_of_backends
    sequences = [random_tokens(i, n) for i, n in enumerate((5, 17, 30))]
    alone = [hf.new_session() for _ in sequences]
    sessions = ([hf.new_session() for _ in sequences], [static.new_session() for _ in sequences])
    # Different cache states: two sessions warm, one fresh.
    for session, tokens in zip(alone, sequences):
        hf.distributions(session, tokens[: len(tokens) // 2], 1)
    for backend, batch in zip(pair_of_backends, sessions):
        for session, tokens in zip(batch[:2], sequences[:2]):
            backend.distributions(session, tokens[: len(tokens) // 2], 1)
    for step in range(4):
        starts = [max(1, len(t) - 3) for t in sequences]
        expected = [hf.distributions(s, t, st) for s, t, st in zip(alone, sequences, starts)]
        got_hf, got_static = score_both(pair_of_backends, sessions, sequences, starts)
        assert_same_rows(got_hf, expected)
        assert_same_rows(got_static, expected)
        assert [s.tokens for s in sessions[1]] == [s.tokens for s in alone]
        sequences = [t + random_tokens(100 * step + i, k) for i, (t, k) in enumerate(zip(sequences, (1, 3, 2)))]


def test_static_rollback_and_prefix_extension_equal_scratch(pair_of_backends):
    _, static = pair_of_backends
    session = static.new_session()
    prefix = random_tokens(11, 40)
    for block_seed in (12, 13, 14):  # three rejected blocks of different lengths, then an accepted one
        static.distributions(session, prefix + random_tokens(block_seed, block_seed - 8), start=len(prefix))
    block = random_tokens(15, 6)
    got = static.distributions(session, prefix + block, start=len(prefix))
    torch.testing.assert_close(got, scratch(static, prefix + block, len(prefix)), atol=1e-5, rtol=1e-4)
    longer = prefix + block + random_tokens(16, 25)  # catch up 25 tokens in one pass
    got = static.distributions(session, longer, start=len(prefix) + 3)
    torch.testing.assert_close(got, scratch(static, longer, len(prefix) + 3), atol=1e-5, rtol=1e-4)
    static.release(session)


def test_static_reclaims_the_least_recently_used_slot_and_the_loser_recomputes(pair_of_backends):
    _, static = pair_of_backends
    sessions = [static.new_session() for _ in range(4)]  # one more than the slots
    sequences = [random_tokens(20 + i, 10 + i) for i in range(4)]
    for session, tokens in zip(sessions, sequences):
        static.distributions(session, tokens, start=len(tokens))
    assert static.occupied_slots == 3
    assert sessions[0].slot is None and sessions[0].cached_length == 0  # the oldest lost its slot
    longer = sequences[0] + [7, 8]
    got = static.distributions(sessions[0], longer, start=len(longer) - 1)  # recomputes from scratch
    torch.testing.assert_close(got, scratch(static, longer, len(longer) - 1), atol=1e-5, rtol=1e-4)
    assert sessions[0].slot is not None and sessions[1].slot is None
    for session in sessions:
        static.release(session)


def test_static_release_keeps_the_slots_compact_and_moves_caches_intact(pair_of_backends):
    _, static = pair_of_backends
    sessions = [static.new_session() for _ in range(3)]
    sequences = [random_tokens(30 + i, 12 + 3 * i) for i in range(3)]
    for session, tokens in zip(sessions, sequences):
        static.distributions(session, tokens, start=len(tokens))
    static.release(sessions[0])
    extended = sequences[2] + [5, 6, 7]
    got = static.distributions(sessions[2], extended, start=len(sequences[2]))  # moved into slot 0 first
    assert sessions[2].slot == 0 and static.occupied_slots == 2
    torch.testing.assert_close(got, scratch(static, extended, len(sequences[2])), atol=1e-5, rtol=1e-4)
    for session in sessions[1:]:
        static.release(session)


def test_static_release_gives_the_slot_back_at_once(pair_of_backends):
    _, static = pair_of_backends
    session = static.new_session()
    static.distributions(session, random_tokens(40, 12), start=12)
    occupied = static.occupied_slots
    assert session.slot is not None
    static.release(session)
    assert static.occupied_slots == occupied - 1
    assert session.slot is None and session.cached_length == 0 and static.session_bytes(session) == 0


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_a_release_from_another_thread_waits_for_the_pass_in_progress(kind):
    backend = backend_class(kind)(tiny_qwen2(VOCAB, seed=3), name=kind)
    session = backend.new_session()
    backend.distributions(session, random_tokens(41, 10), start=10)
    in_pass, finish = threading.Event(), threading.Event()
    forward = backend._forward

    def slow_forward(plans, ids=None):
        in_pass.set()
        finish.wait(timeout=30)
        return forward(plans, ids)

    backend._forward = slow_forward
    scoring = threading.Thread(target=backend.distributions, args=(session, random_tokens(41, 10) + [5, 6], 10))
    scoring.start()
    assert in_pass.wait(timeout=30)
    releasing = threading.Thread(target=backend.release, args=(session,))
    releasing.start()
    releasing.join(timeout=0.3)
    assert releasing.is_alive()  # it waits: the pass is still using the session's cache
    finish.set()
    scoring.join(timeout=30)
    releasing.join(timeout=30)
    assert not releasing.is_alive() and session.cached_length == 0 and backend.session_bytes(session) == 0


def test_static_batch_of_other_slots_than_the_first_ones_equals_hf(pair_of_backends):
    """A batch that is not slots 0..B-1 (some sessions of the replica are not stepping) gathers
    its rows' slots: the same distributions, and the other sessions' caches stay intact."""
    from speccascade.engine.backends import ScoreJob

    hf, static = pair_of_backends
    sequences = [random_tokens(50 + i, 9 + 4 * i) for i in range(3)]
    twins = [(hf.new_session(), static.new_session()) for _ in sequences]
    for (h, s), tokens in zip(twins, sequences):
        hf.distributions(h, tokens, 1)
        static.distributions(s, tokens, 1)
    assert [s.slot for _, s in twins] == [0, 1, 2]
    for batch in ([2, 0], [1, 2], [2]):
        grown = {i: sequences[i] + random_tokens(60 + i, 3) for i in batch}
        expected = hf.score([ScoreJob(twins[i][0], grown[i], len(sequences[i])) for i in batch])
        got = static.score([ScoreJob(twins[i][1], grown[i], len(sequences[i])) for i in batch])
        assert_same_rows(got, expected)
        sequences = [grown.get(i, t) for i, t in enumerate(sequences)]
    for i, tokens in enumerate(sequences):  # every session, stepped or not, still scores exactly
        got = static.distributions(twins[i][1], tokens + [4], len(tokens))
        torch.testing.assert_close(got, scratch(static, tokens + [4], len(tokens)), atol=1e-5, rtol=1e-4)
    for h, s in twins:
        hf.release(h)
        static.release(s)


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_steps_on_tokens_chosen_on_the_device_equal_scoring_the_known_tokens(kind):
    """`step` feeds tokens the host never reads (a drafter's block); after `settle` the sessions
    hold the same tokens and caches as if the ids had been scored directly."""
    from speccascade.engine.backends import UNSETTLED, ScoreJob

    backend = backend_class(kind)(tiny_qwen2(VOCAB, seed=3), name=kind)
    contexts = [random_tokens(70, 11), random_tokens(71, 6)]
    stepped, scored = [backend.new_session() for _ in contexts], [backend.new_session() for _ in contexts]
    for session, twin, context in zip(stepped, scored, contexts):
        backend.distributions(session, context, len(context))
        backend.distributions(twin, context, len(context))
    chosen = [[5, 9, 13], [17, 2, 8]]
    for k in range(3):
        rows = backend.step(stepped, torch.tensor([chosen[0][k], chosen[1][k]]))
        expected = backend.score([ScoreJob(twin, context + c[: k + 1], len(context) + k + 1)
                                  for twin, context, c in zip(scored, contexts, chosen)])
        torch.testing.assert_close(rows, torch.stack([e[0] for e in expected]), atol=1e-5, rtol=1e-4)
    assert all(s.tokens[-3:] == [UNSETTLED] * 3 for s in stepped)
    for session, c in zip(stepped, chosen):
        backend.settle(session, c)
    assert [s.tokens for s in stepped] == [context + c for context, c in zip(contexts, chosen)]
    calls = backend.forward_calls
    backend.distributions(stepped[0], contexts[0] + chosen[0], len(contexts[0]) + 3)  # the cache end: no pass
    assert backend.forward_calls == calls


def test_hf_steps_of_one_batch_extend_its_padded_cache_and_each_session_leaves_it_intact():
    """A draft's steps over the same sessions run on one padded batch, with nothing copied in or out
    per step; a session used otherwise afterwards (cut back, alone, in another batch, released) gets
    its own cache back, holding exactly its tokens."""
    from speccascade.engine.backends import ScoreJob

    backend = backend_class("hf")(tiny_qwen2(VOCAB, seed=3), name="hf")
    contexts = [random_tokens(21, 40), random_tokens(22, 9), random_tokens(23, 25)]
    sessions = [backend.new_session() for _ in contexts]
    backend.score([ScoreJob(s, c, len(c)) for s, c in zip(sessions, contexts)])
    batch = sessions[0].batch
    assert batch is not None and all(s.batch is batch and s.cache is None for s in sessions)
    # Each row's bytes: the padded batch's, padding included.
    per_row = backend.session_bytes(sessions[0])
    assert per_row > 0 and all(backend.session_bytes(s) == per_row for s in sessions)
    chosen = [[5, 9, 13], [17, 2, 8], [4, 4, 4]]
    for k in range(3):
        rows = backend.step(sessions, torch.tensor([c[k] for c in chosen]))
        assert all(s.batch is batch for s in sessions)  # extended, not re-padded
        for row, (context, c) in enumerate(zip(contexts, chosen)):
            torch.testing.assert_close(rows[row], scratch(backend, context + c[: k + 1], len(context) + k + 1)[0],
                                       atol=1e-5, rtol=1e-4)
    for session, c in zip(sessions, chosen):
        backend.settle(session, c)
    grown = [context + c for context, c in zip(contexts, chosen)]
    # Cut back after a verdict: the first session keeps 2 of its 3 drafted tokens, alone. That
    # splits the batch: every member owns exactly its tokens again.
    kept = grown[0][:-1] + [7]
    assert_same_rows(backend.score([ScoreJob(sessions[0], kept, len(kept) - 1)]), [scratch(backend, kept, len(kept) - 1)])
    assert all(s.batch is None for s in sessions)
    assert [s.cache.get_seq_length() for s in sessions] == [len(kept), len(grown[1]), len(grown[2])]
    # The other two, in a batch of their own (in the other order): padded anew from their caches.
    pair = [sessions[2], sessions[1]]
    tails = [grown[2] + [1, 2], grown[1] + [3]]
    got = backend.score([ScoreJob(s, t, len(t) - 1) for s, t in zip(pair, tails)])
    assert_same_rows(got, [scratch(backend, t, len(t) - 1) for t in tails])
    assert pair[0].batch is pair[1].batch is not batch
    backend.release(pair[1])
    assert pair[1].batch is None and pair[1].tokens == [] and backend.session_bytes(pair[1]) == 0
    assert pair[0].batch is None and pair[0].cache.get_seq_length() == len(tails[0])  # not left holding two rows
    assert_same_rows([backend.distributions(pair[1], tails[1], 3)], [scratch(backend, tails[1], 3)])
    assert_same_rows([backend.distributions(pair[0], tails[0], 5)], [scratch(backend, tails[0], 5)])


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_a_session_twice_in_one_step_is_refused_and_its_cache_stays_whole(kind):
    backend = backend_class(kind)(tiny_qwen2(VOCAB, seed=3), name=kind)
    session, context = backend.new_session(), random_tokens(72, 9)
    backend.distributions(session, context, len(context))
    with pytest.raises(ValueError, match="twice"):
        backend.step([session, session], torch.tensor([5, 5]))
    assert session.tokens == context
    torch.testing.assert_close(backend.distributions(session, context + [5], len(context)),
                               scratch(backend, context + [5], len(context)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_a_pass_that_fails_leaves_its_sessions_empty_and_the_next_call_recomputes_exactly(kind):
    """A pass that raised midway (a device error, out of memory) may have written some caches;
    its sessions are emptied, never left holding keys their token lists do not name."""
    backend = backend_class(kind)(tiny_qwen2(VOCAB, seed=3), name=kind)
    sessions = [backend.new_session() for _ in range(2)]
    contexts = [random_tokens(73, 8), random_tokens(74, 12)]
    for session, context in zip(sessions, contexts):
        backend.distributions(session, context, len(context))
    forward = backend._forward

    def failing_forward(plans, ids=None):
        forward(plans, ids)  # the caches move on, then the pass fails
        raise RuntimeError("device lost")

    backend._forward = failing_forward
    with pytest.raises(RuntimeError, match="device lost"):
        backend.step(sessions, torch.tensor([3, 4]))
    with pytest.raises(RuntimeError, match="device lost"):
        backend.distributions(sessions[0], contexts[0] + [7], len(contexts[0]))
    backend._forward = forward
    assert all(session.cached_length == 0 for session in sessions)
    for session, context in zip(sessions, contexts):
        grown = context + [9, 10]
        torch.testing.assert_close(backend.distributions(session, grown, len(context)),
                                   scratch(backend, grown, len(context)), atol=1e-5, rtol=1e-4)


def test_static_refuses_a_sequence_longer_than_its_slots():
    static = backend_class("static")(tiny_qwen2(VOCAB, seed=3), name="static", slots=2, max_len=32)
    assert static.context_window == 32
    with pytest.raises(ValueError, match="max_len of 32"):
        static.distributions(static.new_session(), random_tokens(1, 40), start=40)


def test_vocabulary_is_cut_to_the_tokenizer_ids():
    """Output rows past the tokenizer's ids are padding: distributions have no entry for them."""
    model = tiny_qwen2(VOCAB + 44, seed=5)
    for kind in BACKEND_KINDS:
        backend = backend_class(kind)(model, name=kind, vocab_size=VOCAB)
        rows = backend.distributions(backend.new_session(), random_tokens(2, 9), start=5)
        assert rows.shape == (5, VOCAB)
        torch.testing.assert_close(rows.sum(-1), torch.ones(5))
    with pytest.raises(ValueError, match="fewer than the"):
        backend_class("hf")(model, name="small", vocab_size=VOCAB + 45)


def test_logits_to_keep_gathers_a_partial_set_of_rows_and_takes_all_rows_as_an_int():
    from speccascade.engine.backends.base import logits_to_keep

    assert logits_to_keep(1, 1) == 1 and logits_to_keep(6, 6) == 6
    assert logits_to_keep(5, 2).tolist() == [3, 4]  # not the int: a slice would copy the output weight (CPU, bf16)


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_a_pass_keeping_fewer_rows_than_it_feeds_names_them_and_scores_right(kind):
    backend = backend_class(kind)(tiny_qwen2(VOCAB, seed=3), name=kind)
    seen = []
    forward = backend.model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["logits_to_keep"])
        return forward(*args, **kwargs)

    backend.model.forward = spy
    tokens = random_tokens(4, 12)
    session = backend.new_session()
    rows = backend.distributions(session, tokens, start=12)  # one pass over 12 tokens, one row kept
    assert isinstance(seen[-1], torch.Tensor) and seen[-1].tolist() == [11]
    backend.model.forward = forward
    torch.testing.assert_close(rows, scratch(backend, tokens, 12), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_a_backend_keeps_no_autograd_state(kind):
    """Serving never trains: parameters are frozen, so no pass (nor a CUDA graph's capture, which
    would keep every activation in its memory pool) records a graph for backward."""
    backend = backend_class(kind)(tiny_qwen2(VOCAB, seed=3), name=kind)
    assert not any(p.requires_grad for p in backend.model.parameters())
    with torch.enable_grad():
        logits = backend.model(torch.tensor([random_tokens(1, 6)])).logits
    assert logits.grad_fn is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
def test_static_cuda_graphs_equal_eager_on_the_gpu():
    model = tiny_qwen2(VOCAB, seed=3).cuda()
    eager = backend_class("static")(model, name="eager", slots=4, max_len=128, cuda_graphs=False)
    graphed = backend_class("static")(model, name="graphed", slots=4, max_len=128, cuda_graphs=True)
    from speccascade.engine.backends.graphs import planned_shapes

    # Captured when the backend started, every planned shape within the default budget.
    assert graphed.graphs is not None and len(graphed.graphs.graphs) == len(planned_shapes(4, 128))
    sessions = ([eager.new_session() for _ in range(3)], [graphed.new_session() for _ in range(3)])
    sequences = [random_tokens(40 + i, 8 + 5 * i) for i in range(3)]
    from speccascade.engine.backends import ScoreJob

    for step in range(5):
        starts = [max(1, len(t) - 2) for t in sequences]
        a, b = (backend.score([ScoreJob(s, t, st) for s, t, st in zip(ss, sequences, starts)])
                for backend, ss in zip((eager, graphed), sessions))
        assert_same_rows([x.cpu() for x in b], [x.cpu() for x in a])
        sequences = [t + random_tokens(200 + step, 2) for t in sequences]
    for batch in ([1, 2], [2, 1, 0]):  # gathered rows (not slots 0..B-1), in another order
        starts = [len(sequences[i]) - 1 for i in batch]
        a, b = (backend.score([ScoreJob(ss[i], sequences[i], st) for i, st in zip(batch, starts)])
                for backend, ss in zip((eager, graphed), sessions))
        assert_same_rows([x.cpu() for x in b], [x.cpu() for x in a])
    # Every decode step replayed a graph (the first, the prompts' prefill, is wider than any).
    assert graphed.steps["graph"] >= 5 and graphed.steps["eager"] == graphed.steps["uncaptured"] == 0


def test_every_pass_is_counted_by_how_it_ran(runner):
    """On the CPU no backend captures graphs: every pass is eager, none a replay or a fallback."""
    before = dict(runner.steps)
    calls = runner.forward_calls
    runner.distributions(runner.new_session(), random_tokens(70, 12), start=6)
    grew = {how: runner.steps[how] - before[how] for how in before}
    assert grew == {"graph": 0, "eager": runner.forward_calls - calls, "wide": 0, "uncaptured": 0}
    assert grew["eager"] >= 1


def test_a_session_that_loses_its_static_slot_is_counted_once_and_logged_once(caplog):
    backend = backend_class("static")(tiny_qwen2(VOCAB, seed=3), name="few-slots", slots=2, max_len=64)
    sessions = [backend.new_session() for _ in range(4)]
    with caplog.at_level("WARNING", logger="speccascade.engine.backends.static"):
        for index, session in enumerate(sessions[:2]):
            backend.distributions(session, random_tokens(80 + index, 6), start=6)
        assert backend.slot_evictions == 0
        for index, session in enumerate(sessions[2:]):
            backend.distributions(session, random_tokens(82 + index, 6), start=6)
    assert backend.slot_evictions == 2
    assert sessions[0].slot is None and sessions[1].slot is None  # the least recently used lost theirs
    assert len(caplog.records) == 1 and "all 2 slots in use" in caplog.records[0].getMessage()


class EagerGraphs:
    """The static backend's captured graphs without CUDA, for the CPU: `GraphSet`'s choice of shape
    and its explanations, with a 'replay' that runs the step the graph would have captured eagerly on
    the padded inputs. `captured` picks which planned shapes count as captured (the rest: over the
    memory budget)."""

    def __init__(self, backend, *, max_rows: int, captured):
        from speccascade.engine.backends.graphs import (
            TOKEN_BUCKETS,
            GraphSet,
            planned_shapes,
            row_buckets,
            window_buckets,
        )

        self.graphset = GraphSet.__new__(GraphSet)
        planned = planned_shapes(max_rows, backend.max_len)  # the rows and windows GraphSet gets from the backend
        vars(self.graphset).update(rows=row_buckets(max_rows), windows=window_buckets(backend.max_len), budget_mb=1,
                                   graphs={s: None for s in planned if captured(s)},
                                   skipped=[s for s in planned if not captured(s)])
        self.step = backend._graph_step
        self.out = torch.empty(self.graphset.rows[-1], TOKEN_BUCKETS[-1], backend.vocab_size)
        self.replayed = []

    def __getattr__(self, name):
        return getattr(self.graphset, name)

    def replay(self, shape, ids, positions, slots):
        assert ids.shape == positions.shape == (shape.rows, shape.tokens) and slots.shape == (shape.rows,)
        self.replayed.append(shape)
        self.step(ids, positions, slots, shape.window, self.out)
        return self.out[: shape.rows, : shape.tokens]


def test_static_steps_padded_to_captured_shapes_score_as_eager_and_are_counted(caplog):
    """A step replays the smallest captured shape that holds it (rows, tokens a row and window
    padded): the same distributions as the eager step. A prefill wider than any graph is `wide`; a
    step whose shape the budget left out is `uncaptured`, logged once with the reason."""
    from speccascade.engine.backends import ScoreJob
    from speccascade.engine.backends.graphs import Shape

    model = tiny_qwen2(VOCAB, seed=3)
    eager = backend_class("static")(model, name="eager", slots=4, max_len=512)
    graphed = backend_class("static")(model, name="graphed", slots=4, max_len=512)
    graphed.graphs = EagerGraphs(graphed, max_rows=4, captured=lambda s: s.window == 256 and s.rows <= 2)
    sequences = [random_tokens(90 + i, 30 + 7 * i) for i in range(3)]
    sessions = ([eager.new_session() for _ in sequences], [graphed.new_session() for _ in sequences])

    def both(indices, starts):
        got = [backend.score([ScoreJob(ss[i], sequences[i], st) for i, st in zip(indices, starts)])
               for backend, ss in zip((eager, graphed), sessions)]
        assert_same_rows(got[1], got[0])

    with caplog.at_level("WARNING", logger="speccascade.engine.backends.static"):
        both([0, 1], [len(sequences[0]), len(sequences[1])])  # prefills of 30 and 37 tokens: wider than 17
        assert graphed.steps == {"graph": 0, "eager": 0, "wide": 1, "uncaptured": 0}
        for _ in range(2):  # one token each: 2 rows of 1 token over a 256-key window
            sequences[:2] = [t + random_tokens(len(t), 1) for t in sequences[:2]]
            both([0, 1], [len(sequences[0]) - 1, len(sequences[1]) - 1])
        sequences[1] += random_tokens(7, 6)  # a verify of 6 tokens on one row: 1 x 8 x 256
        both([1], [len(sequences[1]) - 5])
        assert graphed.graphs.replayed == [Shape(2, 1, 256), Shape(2, 1, 256), Shape(1, 8, 256)]
        assert graphed.steps["graph"] == 3 and graphed.steps["uncaptured"] == 0
        both([2], [len(sequences[2])])  # the third session's prefill (44 tokens)
        for _ in range(2):  # three rows: the 4-row shapes were left out by the "budget"
            sequences = [t + random_tokens(len(t) + 1, 1) for t in sequences]
            both([0, 1, 2], [len(t) - 1 for t in sequences])
    assert graphed.steps == {"graph": 3, "eager": 0, "wide": 2, "uncaptured": 2}
    assert eager.steps["eager"] == eager.forward_calls and eager.steps["graph"] == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "3 rows x 1 tokens" in warnings[0] and "graph memory budget" in warnings[0]
