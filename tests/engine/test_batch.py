"""Many requests through one pair at once (`engine.batch`): each output is the one decoding it
alone gives (fp32, greedy and sampled, every method in one batch), the run holds at most N at a
time, a request that fails ends alone, prompts are prefilled alone, and the latency model's
arithmetic and measured costs."""

from __future__ import annotations

import pytest
from speccascade.engine import batch as batching
from speccascade.engine.batch import CallCosts, CallLog, generate_many
from speccascade.engine.request import GenerationRequest
from speccascade.options import SamplingParams

PROMPTS = ["def add(a, b):", "The capital of France is", "for i in range(10):\n    print(",
           "# A function that reverses a string, with tests for the empty string and one character\ndef rev(s):"]
SAMPLINGS = {"greedy": SamplingParams(), "sampled": SamplingParams(temperature=0.8, top_p=0.9)}
METHODS = [dict(rule="lossless"), dict(rule="token", alpha=0.3), dict(rule="chow", alpha=0.3),
           dict(rule="opt", alpha=0.3), dict(rule="token_v1", alpha=0.1), dict(method="expert"),
           dict(method="drafter"), dict(method="token-cascade", alpha=0.3),
           dict(method="sequence-cascade", alpha=0.1)]


def request(index: int, sampling: str, **options) -> GenerationRequest:
    options = {"max_new_tokens": 14, "block_size": 4, **options}
    return GenerationRequest(prompt=PROMPTS[index % len(PROMPTS)], sampling=SAMPLINGS[sampling], seed=100 + index,
                             **options)


@pytest.fixture(scope="module")
def static_engine(tokenizer):
    from ..conftest import make_engine

    return make_engine(tokenizer, backend="static")


@pytest.mark.parametrize("sampling", sorted(SAMPLINGS))
@pytest.mark.parametrize("backend", ["hf", "static"])
def test_every_method_in_one_batch_decodes_as_it_does_alone(engine, static_engine, backend, sampling):
    engine = engine if backend == "hf" else static_engine
    requests = [request(i, sampling, **options) for i, options in enumerate(METHODS)]
    outcomes, stats = generate_many(engine, requests, concurrency=len(requests))
    for req, outcome in zip(requests, outcomes):
        assert outcome.error is None, outcome.error
        alone = engine.generate(req)
        assert outcome.result.token_ids == alone.token_ids, (req.method, req.rule)
        assert outcome.result.sources == alone.sources
        assert outcome.result.finish_reason == alone.finish_reason
    assert stats.calls_per_batch("expert") > 1  # passes were shared
    assert stats.batches["drafter"] and stats.wall_s > 0


def test_at_most_n_run_at_once_and_the_next_starts_as_one_ends(engine):
    requests = [request(i, "greedy", rule="lossless", max_new_tokens=6 + 3 * i) for i in range(5)]
    done: list[int] = []
    outcomes, stats = generate_many(engine, requests, concurrency=2, on_done=lambda i, _: done.append(i))
    assert sorted(done) == list(range(5)) and all(o.error is None for o in outcomes)
    assert stats.calls_per_batch("expert") <= 2 and stats.calls_per_batch("drafter") <= 2
    assert [o.result.token_ids for o in outcomes] == [engine.generate(r).token_ids for r in requests]


def test_a_request_that_fails_ends_alone(engine, monkeypatch):
    too_long = GenerationRequest(prompt="word " * 2000, max_new_tokens=8, seed=1)  # past the models' window
    poisoned_seed = 666
    real_verify = batching.verify_blocks_on

    def verify(backend, jobs):
        if any(job.seed == poisoned_seed for job in jobs):
            raise RuntimeError("a verify pass failed")
        return real_verify(backend, jobs)

    monkeypatch.setattr(batching, "verify_blocks_on", verify)
    requests = [request(0, "greedy", rule="lossless"), too_long, request(1, "sampled", rule="token", alpha=0.3),
                GenerationRequest(prompt=PROMPTS[2], max_new_tokens=8, seed=poisoned_seed)]
    outcomes, _ = generate_many(engine, requests, concurrency=4)
    assert isinstance(outcomes[1].error, ValueError) and outcomes[1].result is None
    assert isinstance(outcomes[3].error, RuntimeError) and "verify pass failed" in str(outcomes[3].error)
    monkeypatch.setattr(batching, "verify_blocks_on", real_verify)
    for index in (0, 2):
        assert outcomes[index].error is None
        assert outcomes[index].result.token_ids == engine.generate(requests[index]).token_ids


def test_prompts_are_prefilled_alone_and_every_call_is_logged(engine):
    long_prompt = request(3, "greedy", rule="lossless")  # over PREFILL_THRESHOLD tokens
    assert len(engine.prepare(long_prompt)[0]) > batching.PREFILL_THRESHOLD
    (outcome,), stats = generate_many(engine, [long_prompt])
    log, result = outcome.calls, outcome.result
    assert stats.prefills == 2 and log.prefill_tokens == 2 * len(engine.prepare(long_prompt)[0])
    assert log.prefill_s > 0
    assert len(log.drafts) == result.stats.drafter_calls and len(log.verifies) == result.stats.expert_passes
    # After its prefill the first draft only chose, and the first verify fed just the block; later
    # verifies feed the last context token too.
    assert log.drafts[0][1] == 0 and log.verifies[0] == log.drafts[0][0]
    assert all(fed == 1 + gamma for fed, (gamma, _) in zip(log.verifies[1:], log.drafts[1:]))


def test_the_model_charges_each_call_its_single_stream_cost():
    costs = CallCosts(draft_first={0: 0.001, 1: 0.010, 2: 0.012}, draft_step=0.008,
                      verify={1: 0.050, 2: 0.060, 5: 0.090})
    assert costs.draft(5, 1) == pytest.approx(0.010 + 4 * 0.008)
    assert costs.draft(1, 4) == pytest.approx(0.016)  # past the measured sizes: extended linearly
    assert costs.verify_cost(3) == pytest.approx(0.070)  # between measured sizes: interpolated
    assert costs.verify_cost(7) == pytest.approx(0.110)
    log = CallLog(prefill_s=0.5, drafts=[(5, 0), (5, 2)], verifies=[6, 6])
    assert costs.model(log) == pytest.approx(0.5 + (0.001 + 0.032) + (0.012 + 0.032) + 2 * 0.100)


def test_measured_costs_cover_every_call_size_of_a_round(engine):
    req = request(0, "sampled", rule="token", alpha=0.3)
    costs = CallCosts.measure(engine, engine.prepare(req)[0], req, repeats=1)
    assert set(costs.draft_first) == {0, 1, 2} and set(costs.verify) == set(range(1, req.block_size + 2))
    assert all(v > 0 for v in [*costs.draft_first.values(), *costs.verify.values()]) and costs.draft_step >= 0
    assert costs.draft(req.block_size, 1) > costs.draft_first[1]
