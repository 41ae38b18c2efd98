"""Slim tier calls: a call carries what changed since the session's last call, and a replica that
does not hold what it builds on asks for the whole sequence."""

from __future__ import annotations

from speccascade.serving.wire import KnownTokens, SentTokens


def test_a_delta_carries_only_the_tokens_after_the_common_prefix():
    sent, known = SentTokens(), KnownTokens()
    context = list(range(100, 140))
    first = sent.delta(context)
    assert first.position == 0 and first.tokens.tolist() == context
    assert known.apply(first)
    sent.sent(first, context)
    # The round kept 2 drafted tokens and added one: the block's rejected tail is replaced.
    grown = context[:38] + [7, 8, 9]
    second = sent.delta(grown)
    assert (second.position, second.tokens.tolist()) == (38, [7, 8, 9]) and second.base == first.version
    assert second.tokens.dtype.name == "int32" and second.nbytes < 4 * len(grown)
    assert known.apply(second) and known.tokens == grown


def test_a_replica_that_missed_the_base_call_asks_for_the_whole_sequence():
    sent, replica_a, replica_b = SentTokens(), KnownTokens(), KnownTokens()
    first = sent.delta([1, 2, 3, 4])
    assert replica_a.apply(first)
    sent.sent(first, [1, 2, 3, 4])
    second = sent.delta([1, 2, 3, 4, 5])
    assert not replica_b.apply(second)  # it never saw [1, 2, 3, 4]
    assert replica_b.tokens == []
    again = sent.delta([1, 2, 3, 4, 5], whole=True)
    assert replica_b.apply(again) and replica_b.tokens == [1, 2, 3, 4, 5]
    sent.sent(again, [1, 2, 3, 4, 5])
    # Back on replica A, which holds an older version: the next delta does not build on it.
    third = sent.delta([1, 2, 3, 4, 5, 6])
    assert not replica_a.apply(third) and replica_a.tokens == [1, 2, 3, 4]


def test_a_retried_call_applies_once():
    sent, known = SentTokens(), KnownTokens()
    delta = sent.delta([1, 2, 3])
    assert known.apply(delta) and known.apply(delta)  # the same call again, after an error on the way back
    assert known.tokens == [1, 2, 3] and known.version == delta.version
