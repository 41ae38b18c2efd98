"""Served: a pair that shares a tokenizer but not an output-layer size (the Qwen2.5 0.5B drafter
with a 7B-sized expert) decodes over gRPC exactly as in-process. Tiny random models with the real
Qwen output sizes and tokenizer (taken from the packaged drafter, hence `real_model`)."""

from __future__ import annotations

import pytest
from speccascade.api.client import SpecCascadeClient
from speccascade.engine.request import GenerationRequest
from speccascade.options import SamplingParams

from ..served import app_args, deployed

pytestmark = pytest.mark.real_model

APP = "speccascade-qwen-shaped"
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def qwen_shaped_client(grpc_port, qwen_shaped_pair):
    with deployed(APP, app_args(*qwen_shaped_pair)):
        with SpecCascadeClient(f"127.0.0.1:{grpc_port}", application=APP) as client:
            yield client


@pytest.mark.parametrize("rule,sampling", [("lossless", {}), ("token", dict(temperature=0.8, top_p=0.95))],
                         ids=["greedy-lossless", "sampled-token"])
def test_the_pair_decodes_over_grpc_as_in_process(qwen_shaped_client, qwen_shaped_pair, rule, sampling):
    from speccascade.engine.engine import CascadeEngine

    engine = CascadeEngine.load(*qwen_shaped_pair, dtype="fp32", device="cpu", progress=False)
    expected = engine.generate(GenerationRequest(prompt=PROMPT, rule=rule, alpha=0.3, block_size=4, max_new_tokens=20,
                                                 sampling=SamplingParams(**sampling), seed=8))
    response = qwen_shaped_client.generate(prompt=PROMPT, rule=rule, alpha=0.3, max_new_tokens=20, seed=8, **sampling)
    assert list(response.token_ids) == expected.token_ids
    assert max(response.token_ids) < len(engine.tokenizer)
