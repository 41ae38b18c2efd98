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
    assert sample(probs.view(4, 25, 50), torch.Generator().manual_seed(3), greedy=False).shape == (4, 25)


@pytest.mark.parametrize("scale", [1.0, 7.5e-3], ids=["normalised", "unnormalised"])
def test_sample_draws_each_token_by_its_probability_and_never_one_without_mass(scale):
    """Every row drawn with one uniform of the generator: a chi-square test over many rows of one
    distribution whose first, middle and last tokens have no mass (an inverse-CDF off by one
    position draws exactly those)."""
    from scipy.stats import chisquare

    dist = torch.tensor([0.0, 0.05, 0.3, 0.0, 0.15, 1e-3, 0.2, 0.299, 0.0], dtype=torch.float64)
    rows = 20_000
    drawn = sample((dist * scale).float().expand(rows, -1), torch.Generator().manual_seed(11), greedy=False)
    counts = torch.bincount(drawn, minlength=dist.numel()).double()
    support = dist > 0
    assert counts[~support].sum() == 0
    _, pvalue = chisquare(counts[support].numpy(), (dist[support] / dist[support].sum() * rows).numpy())
    assert pvalue > 1e-3, counts.tolist()
    wrong = dist[[0, 2, 1, 3, 4, 5, 6, 7, 8]]  # two tokens' masses swapped: the test can fail
    _, pvalue = chisquare(counts[support].numpy(), (wrong[support] / wrong[support].sum() * rows).numpy())
    assert pvalue < 1e-6


def test_sample_draws_a_token_of_tiny_mass_at_its_rate_beside_a_large_vocabulary():
    """A Qwen-sized row: one token of mass 0.5, the rest spread thinly. Half the draws land on it."""
    vocab = 151_936
    row = torch.full((vocab,), 0.5 / (vocab - 1))
    row[vocab // 3] = 0.5
    drawn = sample(row.expand(4000, -1), torch.Generator().manual_seed(2), greedy=False)
    share = (drawn == vocab // 3).double().mean().item()
    assert abs(share - 0.5) < 4 * (0.25 / 4000) ** 0.5
    assert 0 <= int(drawn.min()) and int(drawn.max()) < vocab


@pytest.mark.parametrize("row", [[0.5, float("nan"), 0.5], [0.5, -0.1, 0.6], [0.0, 0.0, 0.0], [0.2, float("inf"), 0.1]],
                         ids=["nan", "negative", "no-mass", "inf"])
def test_sample_refuses_a_row_that_is_not_a_distribution(row):
    with pytest.raises(ValueError, match="NaN, inf or a negative value, or has no mass"):
        sample(torch.tensor([[0.2, 0.3, 0.5], row]), torch.Generator().manual_seed(0), greedy=False)


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


def assert_nucleus_by_definition(probs: torch.Tensor) -> None:
    """`nucleus` keeps the tokens the whole row's sort keeps, with their probabilities, at several top-p."""
    from speccascade.cascade.sampling import nucleus

    for top_p in (0.5, 0.9, 0.95):
        got = nucleus(probs, top_p)
        assert torch.equal(got > 0, full_sort_nucleus(probs, top_p) > 0), top_p
        torch.testing.assert_close(got, torch.where(got > 0, probs, torch.zeros_like(probs)))


def _rows_with_nuclei(heavy_counts: list[int], vocab: int, seed: int = 0) -> torch.Tensor:
    """One row per count: that many tokens, at random places, share 0.99 of the mass (unevenly), the
    rest of the vocabulary 0.01, so a top-p of 0.95 keeps roughly that many tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for heavy in heavy_counts:
        row = torch.rand(vocab, generator=generator) * 0.01 / vocab * 2
        places = torch.randperm(vocab, generator=generator)[:heavy]
        weights = torch.rand(heavy, generator=generator) + 0.5
        row[places] = 0.99 * weights / weights.sum()
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("heavy", [[20], [20, 400], [20, 400, 3000]],
                         ids=["within the first candidates", "within the second", "the whole row sorted"])
def test_the_nucleus_from_the_most_likely_candidates_is_the_nucleus_of_the_whole_row(heavy):
    from speccascade.cascade.sampling import NUCLEUS_CANDIDATES, nucleus

    vocab = 20 * NUCLEUS_CANDIDATES[-1]
    probs = _rows_with_nuclei(heavy, vocab)
    assert_nucleus_by_definition(probs)
    kept = (nucleus(probs, 0.95) > 0).sum(dim=-1).tolist()
    # Each row's nucleus lies where the test meant it to: every stage of `nucleus` was reached.
    bounds = [0, *NUCLEUS_CANDIDATES, vocab]
    for count, nucleus_size in zip(heavy, kept):
        stage = next(i for i in range(len(bounds) - 1) if count <= bounds[i + 1])
        assert bounds[stage] < nucleus_size <= bounds[stage + 1], (count, nucleus_size)


@pytest.mark.parametrize("sharpness", [8.0, 0.05], ids=["peaked", "flat"])
def test_the_nucleus_of_softmax_rows_is_the_nucleus_of_the_whole_row(sharpness):
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 5, 20_000, generator=generator) * sharpness, dim=-1)
    assert_nucleus_by_definition(probs)
