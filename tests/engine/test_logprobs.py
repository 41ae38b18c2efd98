"""Logprobs, exactly (fp32): every output token's log-probability and top k against a direct
computation with the tiny models (log_softmax of their logits over the whole sequence, and each
rule's target built here from those), greedy and sampled, for every rule and baseline; and the
prompt's logprobs under the expert."""

from __future__ import annotations

import pytest
import torch
from speccascade.engine.loop import speculative_rounds
from speccascade.engine.request import GenerationRequest
from speccascade.engine.roles import LocalDrafter, LocalExpert
from speccascade.engine.stats import Source
from speccascade.options import Method, SamplingParams

from .test_loop import first_rounds

PROMPT = "def fibonacci(n):"
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95)
K = 5
# fp32. The backends' cached, incremental passes and the one full pass here differ by float rounding
# (relative 1e-4 in probability, as the backends' own tests allow), which the blended targets (token,
# lossy: sums and a renormalised residual) amplify a few times; a wrong distribution is off by far
# more. The math itself is checked to 1e-6 on exact inputs in tests/cascade/test_logprobs.py.
TOL = dict(abs=2e-3, rel=1e-3)


def log_softmax_rows(backend, ids: list[int]) -> torch.Tensor:
    """Row i: the model's log-distribution of the token at position i + 1, by one full pass."""
    with torch.no_grad():
        logits = backend.model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:, : backend.vocab_size], dim=-1)


def expected_target(rule: str, alpha: float, log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """log pi at one drafted position, built here from the paper's definitions (not the package's)."""
    q, p = log_q.exp(), log_p.exp()
    if rule == "lossless":
        return log_p
    if rule == "chow":
        return log_p if q.max() < 1 - alpha else log_q
    if rule == "diff":
        return log_p if q.max() < p.max() - alpha else log_q
    if rule == "token":
        keep = p >= (1 - alpha) * p.max()
        pi = torch.where(keep, q, 0) + p * q[~keep].sum()
        return pi.log()
    if rule == "lossy":
        kept = q * torch.clamp(p / ((1 - alpha) * q), max=1)
        excess = (p - q).clamp_min(0)
        pi = kept + (1 - kept.sum()) * excess / excess.sum()
        return pi.log()
    raise AssertionError(rule)


def assert_logprob(entry, token: int, log_pi: torch.Tensor, k: int = K) -> None:
    logprob, top = entry
    assert logprob == pytest.approx(float(log_pi[token]), **TOL)
    values, ids = log_pi.topk(k)
    assert [i for i, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(values.tolist(), **TOL)


def run_rounds(engine, request: GenerationRequest, rounds: int = 6):
    prompt = engine.encode(request)
    drafter, expert = LocalDrafter(engine.drafter), LocalExpert(engine.expert)
    try:
        return prompt, first_rounds(speculative_rounds(drafter, expert, prompt, request, limit=1000), rounds)
    finally:
        drafter.release()
        expert.release()


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("rule,alpha", [("lossless", 0.0), ("chow", 0.3), ("chow", 1.0), ("diff", 0.1),
                                        ("token", 0.5), ("lossy", 0.4)])
def test_every_output_token_has_the_log_probability_of_its_positions_target(engine, rule, alpha, sampling):
    """Per round: the accepted drafted tokens and the corrected one have pi at their position, the
    bonus token (a whole block kept) has p; chow's skipped blocks have q."""
    request = GenerationRequest(prompt=PROMPT, rule=rule, alpha=alpha, block_size=3, sampling=sampling, seed=11,
                                logprobs=K)
    prompt, records = run_rounds(engine, request)
    sequence = list(prompt)
    for record in records:
        sequence += [t for t, _ in record.emitted]
    log_p = log_softmax_rows(engine.expert, sequence)
    log_q = log_softmax_rows(engine.drafter, sequence)
    position = len(prompt)
    sources = set()
    for record in records:
        assert len(record.logprobs) == len(record.emitted)
        skipped = bool(record.skipped_blocks)
        bonus = not skipped and record.bonus == 1
        for j, ((token, source), entry) in enumerate(zip(record.emitted, record.logprobs)):
            row = position + j - 1  # the distribution of the token at position + j
            if skipped:
                log_pi = log_q[row]
            elif j == len(record.emitted) - 1 and bonus:
                log_pi = log_p[row]
            else:
                log_pi = expected_target(rule, alpha, log_q[row], log_p[row])
            assert_logprob(entry, token, log_pi)
            sources.add(source)
        position += len(record.emitted)
    if rule != "lossless" and alpha:
        assert Source.DRAFTER in sources  # the q side of the targets was exercised


@pytest.mark.parametrize("method", [Method.EXPERT_ONLY, Method.DRAFTER_ONLY, Method.TOKEN_CASCADE,
                                    Method.SEQUENCE_CASCADE])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_baselines_report_the_model_that_drew_each_token(engine, method, sampling):
    request = GenerationRequest(prompt=PROMPT, method=method, alpha=0.4, max_new_tokens=12, sampling=sampling,
                                seed=5, logprobs=3)
    result = engine.generate(request)
    assert len(result.logprobs) == len(result.token_ids) > 0
    sequence = engine.encode(request) + result.token_ids
    start = len(sequence) - len(result.token_ids)
    log_p = log_softmax_rows(engine.expert, sequence)
    log_q = log_softmax_rows(engine.drafter, sequence)
    for i, (token, source, entry) in enumerate(zip(result.token_ids, result.sources, result.logprobs)):
        rows = log_q if source is Source.DRAFTER else log_p
        assert_logprob(entry, token, rows[start + i - 1], k=3)


def test_the_engines_output_is_the_same_with_and_without_logprobs(engine):
    for rule in ("token", "opt", "chow"):
        plain = GenerationRequest(prompt=PROMPT, rule=rule, alpha=0.5, max_new_tokens=16, sampling=SAMPLED, seed=3)
        with_logprobs = GenerationRequest(prompt=PROMPT, rule=rule, alpha=0.5, max_new_tokens=16, sampling=SAMPLED,
                                          seed=3, logprobs=2)
        assert engine.generate(plain).token_ids == engine.generate(with_logprobs).token_ids
        assert engine.generate(plain).logprobs is None


@pytest.mark.parametrize("max_new_tokens", [0, 4])
def test_prompt_logprobs_are_the_experts_given_each_prefix(engine, max_new_tokens):
    request = GenerationRequest(prompt=PROMPT + " return", max_new_tokens=max_new_tokens, prompt_logprobs=2,
                                logprobs=1, seed=1)
    result = engine.generate(request)
    prompt = engine.encode(request)
    assert len(result.token_ids) == max_new_tokens
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    log_p = log_softmax_rows(engine.expert, prompt)
    for i, entry in enumerate(result.prompt_logprobs[1:], start=1):
        assert_logprob(entry, prompt[i], log_p[i - 1], k=2)
    # Decoding after the scoring pass is what it is without it.
    plain = engine.generate(GenerationRequest(prompt=PROMPT + " return", max_new_tokens=max_new_tokens or 1, seed=1))
    if max_new_tokens:
        assert result.token_ids == plain.token_ids


def test_stream_chunks_carry_their_tokens_logprobs(engine):
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=10, logprobs=0, prompt_logprobs=0, seed=2)
    chunks = list(engine.stream(request))
    assert chunks[0].prompt_logprobs is not None and all(c.prompt_logprobs is None for c in chunks[1:])
    streamed = [entry for c in chunks for entry in c.logprobs]
    assert len(streamed) == sum(len(c.token_ids) for c in chunks)
    assert streamed == chunks[-1].result.logprobs
    assert all(top == () for _, top in streamed)


@pytest.mark.parametrize("field,value", [("logprobs", 21), ("logprobs", -1), ("prompt_logprobs", 21),
                                         ("logprobs", True)])
def test_logprobs_out_of_range_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        GenerationRequest(prompt="x", **{field: value})


def test_zero_new_tokens_only_with_prompt_logprobs():
    with pytest.raises(ValueError, match="max_new_tokens=0 .*only with prompt logprobs"):
        GenerationRequest(prompt="x", max_new_tokens=0)
    GenerationRequest(prompt="x", max_new_tokens=0, prompt_logprobs=0)


@pytest.mark.parametrize("rule", ["token", "chow"])
def test_a_batch_verifies_requests_with_and_without_logprobs_together(engine, rule):
    """A tier's batch groups blocks by (rule, gamma, sampling): a block without logprobs (no
    drafter numbers, no exact rows) beside one with them; each gets what it would get alone."""
    from speccascade.engine.blocks import DraftPayload
    from speccascade.engine.jobs import DraftJob, VerifyJob, draft_blocks, verify_blocks_on
    from speccascade.options import Rule

    prompt = engine.encode(GenerationRequest(prompt=PROMPT))
    sessions = [engine.drafter.new_session() for _ in range(2)]
    payloads = [DraftPayload.for_request(Rule(rule), SAMPLED, logprobs=k) for k in (None, 3)]
    blocks, _ = draft_blocks(engine.drafter, [DraftJob(s, prompt, 3, SAMPLED, 4, payload)
                                              for s, payload in zip(sessions, payloads)])
    experts = [engine.expert.new_session() for _ in range(3)]
    jobs = [VerifyJob(experts[i], prompt + list(block.tokens), len(prompt), block, Rule(rule), 0.4, SAMPLED, 4,
                      logprobs=k) for i, (block, k) in enumerate(zip(blocks, (None, 3)))]
    together, _ = verify_blocks_on(engine.expert, jobs)
    alone, _ = verify_blocks_on(engine.expert, [VerifyJob(experts[2], *[getattr(jobs[1], f) for f in (
        "sequence", "start", "block", "rule", "alpha", "sampling", "seed")], logprobs=3)])
    assert together[0].logprobs is None
    assert together[1].num_accepted == alone[0].num_accepted
    assert together[1].logprobs.chosen.tolist() == pytest.approx(alone[0].logprobs.chosen.tolist(), abs=1e-5)
    assert together[1].logprobs.top_ids.tolist() == alone[0].logprobs.top_ids.tolist()
    for session in sessions:
        engine.drafter.release(session)
    for session in experts:
        engine.expert.release(session)
