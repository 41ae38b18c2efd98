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


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by the definition, from a sort of the whole row."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = before < top_p * probs.sum(dim=-1, keepdim=True)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.where(keep, probs, torch.zeros_like(probs))


@pytest.mark.parametrize("sharpness", [8.0, 0.05], ids=["peaked: within the candidates", "flat: the whole row"])
def test_the_nucleus_from_the_most_likely_candidates_is_the_nucleus_of_the_whole_row(sharpness):
    from speccascade.cascade.sampling import NUCLEUS_CANDIDATES, nucleus

    vocab = 20 * NUCLEUS_CANDIDATES
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 5, vocab, generator=generator) * sharpness, dim=-1)
    for top_p in (0.5, 0.9, 0.95):
        got = nucleus(probs, top_p)
        assert torch.equal(got > 0, full_sort_nucleus(probs, top_p) > 0), top_p
        torch.testing.assert_close(got, torch.where(got > 0, probs, torch.zeros_like(probs)))
        kept = (got > 0).sum(dim=-1)
        if sharpness < 1:  # the flat rows' nuclei reach past the candidates: the fallback ran
            assert kept.min() > NUCLEUS_CANDIDATES
        else:
            assert kept.max() < NUCLEUS_CANDIDATES
