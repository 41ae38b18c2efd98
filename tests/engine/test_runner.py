import pytest
import torch

from speccascade.engine.runner import ModelRunner, common_prefix_length

from ..conftest import tiny_qwen2

VOCAB = 300


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(tiny_qwen2(VOCAB, seed=3), name="tiny")


def scratch(runner: ModelRunner, tokens: list[int], start: int) -> torch.Tensor:
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
