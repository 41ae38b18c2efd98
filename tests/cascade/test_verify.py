import pytest
import torch
from scipy.stats import chisquare
from speccascade.cascade import GREEDY, Rule, SamplingParams, adjust_probs, sample, target_distribution, verify_block
from speccascade.cascade.rules import mixture_defers

V = 5


def one_hot(i: int, n: int = V) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), n).float()


def soft(*values: float) -> torch.Tensor:
    t = torch.tensor(values)
    return t / t.sum()


# --- hand-built greedy cases -------------------------------------------------------------

def test_perfect_match_accepts_all_and_adds_bonus():
    q = torch.stack([soft(1, 8, 1, 1, 1), soft(1, 1, 1, 8, 1)])
    p = torch.stack([soft(1, 9, 1, 1, 1), soft(1, 1, 1, 9, 1), soft(9, 1, 1, 1, 1)])
    v = verify_block("lossless", 0.0, torch.tensor([1, 3]), q, p, GREEDY)
    assert (v.num_accepted, v.next_token, v.is_bonus) == (2, 0, True)


def test_early_mismatch_stops_at_first_rejection_with_expert_token():
    q = torch.stack([soft(1, 8, 1, 1, 1), soft(1, 1, 1, 8, 1), soft(8, 1, 1, 1, 1)])
    p = torch.stack([soft(1, 9, 1, 1, 1), soft(1, 1, 9, 1, 1), soft(9, 1, 1, 1, 1), soft(1, 1, 1, 1, 9)])
    v = verify_block("lossless", 0.0, torch.tensor([1, 3, 0]), q, p, GREEDY)
    assert (v.num_accepted, v.next_token, v.is_bonus) == (1, 2, False)


def test_nothing_deferred_keeps_the_whole_block_even_where_the_expert_disagrees():
    q = torch.stack([soft(1, 30, 1, 1, 1), soft(1, 1, 1, 30, 1)])  # max q ~0.88
    p = torch.stack([soft(9, 1, 1, 1, 1), soft(9, 1, 1, 1, 1), soft(1, 1, 1, 1, 9)])
    v = verify_block("chow", 0.2, torch.tensor([1, 3]), q, p, GREEDY)
    assert (v.num_accepted, v.next_token, v.is_bonus) == (2, 4, True)
    assert v.num_deferred == 0


def test_everything_deferred_is_lossless():
    q = torch.stack([soft(1, 2, 1, 1, 1), soft(1, 1, 1, 2, 1)])  # unsure drafter
    p = torch.stack([soft(1, 9, 1, 1, 1), soft(9, 1, 1, 1, 1), soft(1, 1, 1, 1, 9)])
    v = verify_block("chow", 0.2, torch.tensor([1, 3]), q, p, GREEDY)
    assert (v.num_accepted, v.next_token, v.is_bonus) == (1, 0, False)
    assert v.num_deferred == 2


def test_token_rule_accepts_a_draft_the_expert_rates_nearly_as_good():
    q = torch.stack([soft(1, 8, 1, 1, 1)])
    p = torch.stack([soft(1, 4, 5, 1, 1), soft(1, 1, 1, 1, 9)])  # p(1) = 0.8 max p
    assert verify_block("token", 0.3, torch.tensor([1]), q, p, GREEDY).num_accepted == 1
    v = verify_block("token", 0.1, torch.tensor([1]), q, p, GREEDY)
    assert (v.num_accepted, v.next_token) == (0, 2)


def test_greedy_draws_nothing_from_the_generator():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    q = torch.stack([soft(1, 2, 3, 4, 5)])
    p = torch.stack([soft(5, 4, 3, 2, 1), soft(1, 1, 1, 1, 1)])
    verify_block("opt", 0.5, torch.tensor([4]), q, p, GREEDY, gen)
    assert torch.equal(gen.get_state(), state)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="p \\[gamma \\+ 1, V\\]"):
        verify_block("lossless", 0.0, torch.tensor([1, 2]), torch.rand(2, V), torch.rand(2, V), GREEDY)


# --- statistical: the first emitted token follows the target ------------------------------

TRIALS = 4000


def emitted_tokens(rule, alpha, q, p, sampling, trials=TRIALS, seed=0):
    """Run verify_block on drafts drawn from q; returns the first two emitted tokens per trial
    (the second is -1 when the round emitted only one)."""
    gen = torch.Generator().manual_seed(seed)
    q_sample = adjust_probs(q, sampling)
    drafts = torch.stack([torch.multinomial(q_sample[t], trials, replacement=True, generator=gen)
                          for t in range(q.shape[0])], dim=1)  # [trials, gamma]
    first, second = [], []
    for draft in drafts:
        v = verify_block(rule, alpha, draft, q, p, sampling, gen)
        out = draft[: v.num_accepted].tolist() + [v.next_token]
        first.append(out[0])
        second.append(out[1] if len(out) > 1 else -1)
    return torch.tensor(first), torch.tensor(second)


def expected_target(rule, alpha, q, p, sampling):
    """pi with decisions on the temperature-1 distributions and mass on the sampling ones."""
    q_s, p_s = adjust_probs(q, sampling), adjust_probs(p, sampling)
    if rule == "lossy":
        return target_distribution("lossy", q_s, p_s, alpha)
    if rule in ("token", "token_v1", "token_v2"):  # A written out: q's mass on A kept, the rest to p
        max_p = p.amax(-1, keepdim=True)
        in_a = {"token": p >= (1 - alpha) * max_p, "token_v2": p >= max_p - alpha, "token_v1": q >= max_p - alpha}[rule]
        kept = q_s * in_a
        return kept + p_s * (1 - kept.sum(-1, keepdim=True))
    r = mixture_defers(Rule.parse(rule), q, p, alpha).unsqueeze(-1)
    return torch.where(r, p_s, q_s)


def assert_follows(samples: torch.Tensor, dist: torch.Tensor):
    support = dist > 0
    counts = torch.bincount(samples, minlength=V).float()
    assert counts[~support].sum() == 0, "sampled a token outside the target's support"
    _, pvalue = chisquare(counts[support].numpy(), (dist[support] * counts.sum()).numpy())
    assert pvalue > 1e-3, (counts.tolist(), (dist * counts.sum()).tolist())


Q = torch.stack([soft(5, 2, 1, 1, 1), soft(1, 4, 3, 1, 1)])
P = torch.stack([soft(2, 3, 1, 3, 1), soft(1, 1, 5, 2, 1), soft(1, 2, 3, 4, 5)])
SAMPLINGS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9),
             SamplingParams(temperature=1.3, top_k=4)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["t1", "t0.7-p0.9", "t1.3-k4"])
def test_lossless_reproduces_the_expert_distribution(sampling):
    first, second = emitted_tokens("lossless", 0.0, Q, P, sampling)
    p_s = adjust_probs(P, sampling)
    assert_follows(first, p_s[0])
    assert_follows(second[second >= 0], p_s[1])


@pytest.mark.parametrize("rule,alpha", [("chow", 0.5), ("diff", 0.0), ("opt", 0.4), ("token", 0.5),
                                        ("token", 0.2), ("token_v1", 0.2), ("token_v2", 0.2), ("lossy", 0.3)])
@pytest.mark.parametrize("sampling", SAMPLINGS[:2], ids=["t1", "t0.7-p0.9"])
def test_cascade_reproduces_its_target(rule, alpha, sampling):
    first, _ = emitted_tokens(rule, alpha, Q, P, sampling)
    assert_follows(first, expected_target(rule, alpha, Q, P[:2], sampling)[0])


def test_second_position_follows_its_target_given_the_first_was_kept():
    first, second = emitted_tokens("token", 0.5, Q, P, SamplingParams(temperature=1.0))
    assert_follows(second[second >= 0], target_distribution("token", Q[1], P[1], 0.5))


def test_bonus_comes_from_the_expert_after_a_fully_kept_block():
    # token rule at alpha=1 keeps every draft (pi = q), so the emitted token after the block
    # is always the bonus, distributed as p at position gamma + 1.
    gen = torch.Generator().manual_seed(5)
    sampling = SamplingParams(temperature=1.0)
    bonus = []
    for _ in range(TRIALS // 2):
        draft = torch.multinomial(Q, 1, generator=gen).squeeze(-1)
        v = verify_block("token", 1.0, draft, Q, P, sampling, gen)
        assert v.is_bonus and v.num_accepted == 2
        bonus.append(v.next_token)
    assert_follows(torch.tensor(bonus), P[2])


def inverse_cdf_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """P(F_a^-1(u) = F_b^-1(u)) for u uniform: the length of the unit interval on which both
    inverse distribution functions give the same token."""
    a_cum, b_cum = torch.cumsum(a.double(), 0), torch.cumsum(b.double(), 0)
    a_lo, b_lo = a_cum - a.double(), b_cum - b.double()
    return float((torch.minimum(a_cum, b_cum) - torch.maximum(a_lo, b_lo)).clamp(min=0).sum())


def test_a_bonus_drawn_with_the_drafters_generator_follows_p_and_meets_the_drafters_guess():
    """The loop draws the bonus with the generator of the drafter's own token at that position:
    the bonus still follows p there, and the drafter's guess at it (a pre-draft's first token)
    equals it on the uniforms where both inverse distribution functions agree, far more often
    than independent draws would meet."""
    sampling = SamplingParams(temperature=1.0)
    q_bonus = soft(1, 2, 4, 4, 4)  # the drafter's distribution at the bonus position, near p's
    bonus, hits = [], 0
    for trial in range(TRIALS):
        verify_gen = torch.Generator().manual_seed(10_000 + trial)
        draft = torch.multinomial(Q, 1, generator=verify_gen).squeeze(-1)
        v = verify_block("token", 1.0, draft, Q, P, sampling, verify_gen,  # alpha 1: every draft kept
                         bonus_generator=torch.Generator().manual_seed(trial))
        assert v.is_bonus
        guess = sample(q_bonus, torch.Generator().manual_seed(trial), greedy=False)  # the drafter's draw
        bonus.append(v.next_token)
        hits += int(guess) == v.next_token
    assert_follows(torch.tensor(bonus), P[2])
    coupled, independent = inverse_cdf_overlap(P[2], q_bonus), float((P[2] * q_bonus).sum())
    assert abs(hits / TRIALS - coupled) < 4 * (coupled * (1 - coupled) / TRIALS) ** 0.5
    assert coupled > independent + 0.2


def test_a_block_cut_short_draws_its_correction_as_before_and_the_bonus_generator_is_not_read():
    """Only the bonus takes the drafter's uniform: a corrected token comes from the verify
    generator after the acceptance uniforms, whatever the bonus generator holds."""
    sampling = SamplingParams(temperature=1.0)
    q = torch.stack([one_hot(0) * 0.999 + 0.0002, soft(1, 1, 1, 1, 1)])
    p = torch.stack([one_hot(3) * 0.999 + 0.0002, soft(1, 1, 1, 1, 1), soft(1, 1, 1, 1, 1)])
    for seed in range(20):
        alone = verify_block("lossless", 0.0, torch.tensor([0, 1]), q, p, sampling, torch.Generator().manual_seed(seed))
        paired = verify_block("lossless", 0.0, torch.tensor([0, 1]), q, p, sampling, torch.Generator().manual_seed(seed),
                              bonus_generator=torch.Generator().manual_seed(1000 + seed))
        assert alone.num_accepted == paired.num_accepted == 0  # q's token has almost no mass under p
        assert alone.next_token == paired.next_token


def test_the_statistical_check_detects_a_wrong_distribution():
    first, _ = emitted_tokens("lossless", 0.0, Q, P, SamplingParams(temperature=1.0), trials=3000)
    with pytest.raises(AssertionError):
        assert_follows(first, Q[0])  # lossless output must not look like the drafter's


def test_same_seed_same_verdicts():
    sampling = SamplingParams(temperature=0.9, top_p=0.95)
    a = emitted_tokens("token", 0.4, Q, P, sampling, trials=300, seed=11)
    b = emitted_tokens("token", 0.4, Q, P, sampling, trials=300, seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- many blocks at once -------------------------------------------------------------------

def random_rows(shape, seed: int, sharp: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(*shape, V, generator=gen), dim=-1)


@pytest.mark.parametrize("rule,alphas", [
    ("lossless", [0.0, 0.0, 0.0, 0.0]), ("chow", [0.0, 0.2, 0.5, 1.0]), ("diff", [-1.0, 0.0, 0.1, 0.6]),
    ("opt", [0.0, 0.3, 0.7, 1.0]), ("token", [0.0, 0.2, 0.5, 1.0]), ("token_v1", [0.0, 0.1, 0.3, 1.0]),
    ("token_v2", [0.0, 0.1, 0.3, 1.0]), ("lossy", [0.0, 0.2, 0.5, 0.9]),
])
@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.8, top_p=0.9)], ids=["greedy", "sampled"])
def test_a_batch_of_blocks_verifies_each_block_as_it_would_alone(rule, alphas, sampling):
    """Blocks with different alphas, verified together, each get exactly their lone verdict,
    draws included: a served batch decides like an in-process request."""
    from speccascade.cascade import verify_blocks

    gamma = 4
    q, p = random_rows((len(alphas), gamma), 1), random_rows((len(alphas), gamma + 1), 2)
    tokens = torch.multinomial(q.reshape(-1, V), 1, generator=torch.Generator().manual_seed(3)).view(-1, gamma)
    seeds = [11, 12, 13, 14]
    alone = [verify_block(rule, a, tokens[i], q[i], p[i], sampling, torch.Generator().manual_seed(seeds[i]))
             for i, a in enumerate(alphas)]
    together = verify_blocks(rule, alphas, tokens, q, p, sampling,
                             None if sampling.is_greedy else [torch.Generator().manual_seed(s) for s in seeds])
    assert together.num_accepted.tolist() == [v.num_accepted for v in alone]
    assert together.next_token.tolist() == [v.next_token for v in alone]
    assert together.is_bonus.tolist() == [v.is_bonus for v in alone]
    assert together.deferred.tolist() == [v.deferred.tolist() for v in alone]


def test_verify_blocks_names_mismatched_shapes():
    from speccascade.cascade import verify_blocks

    with pytest.raises(ValueError, match="2 blocks of gamma=3"):
        verify_blocks("lossless", [0.0, 0.0], torch.zeros(2, 3, dtype=torch.long), random_rows((2, 3), 1),
                      random_rows((2, 3), 2), GREEDY)
    with pytest.raises(ValueError, match="one generator per block"):
        verify_blocks("lossless", [0.0], torch.zeros(1, 2, dtype=torch.long), random_rows((1, 2), 1),
                      random_rows((1, 3), 2), SamplingParams(temperature=1.0))


# --- greedy verification from a few numbers per position ----------------------------------

def coarse_rows(shape, seed: int, vocab: int) -> torch.Tensor:
    """Distributions built from small integer weights: many exact ties (maxima shared by several
    tokens, a drafted token exactly at a rule's threshold), where a careless shortcut decides
    differently from the whole distributions."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randint(0, 4, (*shape, vocab), generator=gen).float()
    weights[..., 0] += 1.0  # never all zero
    return weights / weights.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("rule", ["lossless", "chow", "diff", "token", "token_v1", "token_v2", "lossy"])
@pytest.mark.parametrize("rows", [random_rows, coarse_rows], ids=["smooth", "ties"])
def test_greedy_verification_from_evidence_equals_verification_of_whole_distributions(rule, rows):
    """For every rule it covers, `verify_greedy_blocks` gives the verdict `verify_blocks` gives with
    the drafter's one-hot sampling rows, including at drafted tokens that are not q's argmax."""
    from speccascade.cascade import GreedyEvidence, verify_blocks, verify_greedy_blocks

    low = -1.0 if rule == "diff" else 0.0
    high = 0.9 if rule == "lossy" else 1.0
    alphas = [low, high, 0.25, 0.5, 0.75, 0.1, 0.0, 1.0 / 3.0]
    alphas = [min(max(a, low), high) for a in alphas]
    vocab = 7
    for trial in range(40):
        gamma = trial % 6
        q = rows((len(alphas), gamma), 100 + trial, vocab) if rows is coarse_rows else random_rows(
            (len(alphas), gamma), 100 + trial, sharp=float(trial % 4))
        p = rows((len(alphas), gamma + 1), 500 + trial, vocab) if rows is coarse_rows else random_rows(
            (len(alphas), gamma + 1), 500 + trial, sharp=float(trial % 5))
        vocab_of = q.shape[-1] if gamma else p.shape[-1]
        drafted = q.argmax(dim=-1) if trial % 3 else torch.randint(
            0, vocab_of, (len(alphas), gamma), generator=torch.Generator().manual_seed(trial))
        if trial % 5 == 0 and gamma:  # some drafts the expert agrees with
            drafted[:, 0] = p[:, 0].argmax(dim=-1)
        q_sample = torch.zeros_like(q).scatter_(-1, drafted.unsqueeze(-1), 1.0)
        expected = verify_blocks(rule, alphas, drafted, q, p, GREEDY, q_sample=q_sample)
        got = verify_greedy_blocks(rule, alphas, drafted, GreedyEvidence.of(drafted, q, p))
        assert got.num_accepted.tolist() == expected.num_accepted.tolist(), trial
        assert got.next_token.tolist() == expected.next_token.tolist(), trial
        assert got.is_bonus.tolist() == expected.is_bonus.tolist(), trial
        assert got.deferred.tolist() == expected.deferred.tolist(), trial
        assert got.num_accepted.dtype == expected.num_accepted.dtype and got.deferred.dtype == torch.bool


def test_greedy_verification_takes_the_first_of_tied_expert_tokens():
    from speccascade.cascade import GreedyEvidence, verify_greedy_blocks

    q = torch.stack([soft(1, 8, 1, 1, 1)]).unsqueeze(0)
    p = torch.stack([soft(1, 1, 4, 4, 1), soft(1, 3, 1, 3, 1)]).unsqueeze(0)
    drafted = torch.tensor([[1]])
    verdict = verify_greedy_blocks("lossless", [0.0], drafted, GreedyEvidence.of(drafted, q, p))
    assert (int(verdict.num_accepted[0]), int(verdict.next_token[0])) == (0, 2)


def test_greedy_verification_refuses_opt_and_names_mismatched_evidence():
    from speccascade.cascade import GreedyEvidence, verify_greedy_blocks

    drafted = torch.zeros(2, 3, dtype=torch.long)
    evidence = GreedyEvidence.of(drafted, random_rows((2, 3), 1), random_rows((2, 4), 2))
    with pytest.raises(ValueError, match="opt.*verify_blocks"):
        verify_greedy_blocks("opt", [0.5, 0.5], drafted, evidence)
    with pytest.raises(ValueError, match="3 blocks of gamma=3"):
        verify_greedy_blocks("lossless", [0.0] * 3, torch.zeros(3, 3, dtype=torch.long), evidence)
    with pytest.raises(ValueError, match="alpha=1.5 is out of range"):
        verify_greedy_blocks("chow", [0.5, 1.5], drafted, evidence)
