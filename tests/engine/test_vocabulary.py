"""A pair that shares a tokenizer but not an output-layer size (Qwen2.5 0.5B with 7B): it loads,
distributions cover exactly the tokenizer's ids, and decoding is exact. Tiny random models with the
real Qwen output sizes and tokenizer (taken from the packaged drafter, hence `real_model`)."""

from __future__ import annotations

import pytest
from speccascade.engine.request import GenerationRequest
from speccascade.options import SamplingParams

from ..conftest import QWEN_LARGE_ROWS, QWEN_SMALL_ROWS

pytestmark = pytest.mark.real_model

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module", params=["hf", "static"])
def engine(request, qwen_shaped_pair):
    from speccascade.engine.engine import CascadeEngine

    return CascadeEngine.load(*qwen_shaped_pair, dtype="fp32", device="cpu", backend=request.param, progress=False)


def test_the_pair_loads_and_compares_distributions_over_the_shared_ids(engine):
    assert (engine.drafter.output_rows, engine.expert.output_rows) == (QWEN_SMALL_ROWS, QWEN_LARGE_ROWS)
    # The ids of the tokenizer (151,665 in the hub tokenizer; the GGUF-converted one lists 151,936), never
    # the 7B's extra padding rows.
    assert engine.drafter.vocab_size == engine.expert.vocab_size == len(engine.tokenizer) <= QWEN_SMALL_ROWS
    rows = engine.expert.distributions(engine.expert.new_session(), engine.encode(GenerationRequest(prompt=PROMPT)), 2)
    assert rows.shape[-1] == len(engine.tokenizer)


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.9)], ids=["greedy", "sampled"])
def test_decoding_emits_only_real_token_ids(engine, sampling):
    for method, rule in (("cascade", "lossless"), ("cascade", "token"), ("expert", "lossless"), ("drafter", "lossless")):
        result = engine.generate(GenerationRequest(prompt=PROMPT, method=method, rule=rule, alpha=0.3,
                                                   max_new_tokens=24, sampling=sampling, seed=4))
        assert len(result.token_ids) == 24 or result.finish_reason == "stop"
        assert max(result.token_ids) < len(engine.tokenizer), (method, rule)


def test_lossless_greedy_equals_the_experts_greedy_over_the_shared_ids(engine):
    lossless = engine.generate(GenerationRequest(prompt=PROMPT, rule="lossless", max_new_tokens=30, seed=0))
    expert = engine.generate(GenerationRequest(prompt=PROMPT, method="expert", max_new_tokens=30, seed=0))
    assert lossless.token_ids == expert.token_ids
    assert lossless.stats.accepted > 0
