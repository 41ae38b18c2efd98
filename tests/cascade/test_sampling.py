import pytest
import torch
from speccascade.cascade import SamplingParams, adjust_probs, sample


def test_greedy_is_one_hot_argmax():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    torch.testing.assert_close(adjust_probs(probs, SamplingParams()), torch.tensor([[0.0, 1, 0], [1, 0, 0]]))


def test_temperature_matches_scaled_logits():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    got = adjust_probs(torch.softmax(logits, -1), SamplingParams(temperature=0.7))
    torch.testing.assert_close(got, torch.softmax(logits / 0.7, -1))


def test_top_k_keeps_k_most_likely():
    probs = torch.tensor([[0.05, 0.4, 0.15, 0.3, 0.1]])
    got = adjust_probs(probs, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.4 / 0.7, 0, 0.3 / 0.7, 0]]))


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.15, 0.3, 0.1]])
    # sorted: 0.4, 0.3, 0.15 | 0.1, 0.05 -> 0.85 reaches 0.8 with three tokens
    got = adjust_probs(probs, SamplingParams(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.4, 0.15, 0.3, 0.0]]) / 0.85)
    # top_p smaller than the largest probability keeps only the argmax
    torch.testing.assert_close(adjust_probs(probs, SamplingParams(temperature=1.0, top_p=0.1)),
                               torch.tensor([[0.0, 1, 0, 0, 0]]))


def test_sample_is_reproducible_per_generator():
    probs = torch.softmax(torch.randn(100, 50), -1)
    a = sample(probs, torch.Generator().manual_seed(3), greedy=False)
    b = sample(probs, torch.Generator().manual_seed(3), greedy=False)
    assert torch.equal(a, b)
    assert a.shape == (100,)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_k": -3}, "top_k must be in"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_params_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(**kwargs)
