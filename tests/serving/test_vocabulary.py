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


def opt_rows_request(block_size: int) -> dict:
    """The opt rule with pure temperature sampling: each draft call returns, and each verify call
    carries, the block's whole sampling and decision rows, float16 over 151,936 ids."""
    return dict(prompt=PROMPT, rule="opt", alpha=0.3, block_size=block_size, max_new_tokens=24, seed=3,
                temperature=1.0)


@pytest.mark.parametrize("transport", ["direct", "grpc", "ray"])
def test_whole_probability_rows_past_grpc_default_limit_travel_over_every_transport(
        grpc_port, qwen_shaped_client, qwen_shaped_pair, transport):
    """A 16-token block's rows are ~9.7 MB a call: past gRPC's default 4 MiB message, within the
    bound of the direct channel and of Serve's channel between replicas; over Ray actor calls they
    pass through the object store. All answer as in-process."""
    from speccascade.engine.engine import CascadeEngine
    from speccascade.serving.wire import GRPC_MESSAGE_BYTES

    block_size = 16
    assert 2 * block_size * 151_936 * 2 > 4 * 2**20 and 2 * 65 * 152_064 * 4 < GRPC_MESSAGE_BYTES
    engine = CascadeEngine.load(*qwen_shaped_pair, dtype="fp32", device="cpu", progress=False)
    request = opt_rows_request(block_size)
    expected = engine.generate(GenerationRequest(
        prompt=PROMPT, rule="opt", alpha=0.3, block_size=block_size, max_new_tokens=24,
        sampling=SamplingParams(temperature=1.0), seed=3))
    if transport == "direct":  # the module's application: the default transport
        assert list(qwen_shaped_client.generate(**request).token_ids) == expected.token_ids
        return
    app = f"{APP}-{transport}-calls"
    with deployed(app, app_args(*qwen_shaped_pair, router={"tier_transport": transport})):
        with SpecCascadeClient(f"127.0.0.1:{grpc_port}", application=app) as client:
            assert list(client.generate(**request).token_ids) == expected.token_ids


def test_the_router_keeps_nothing_of_a_finished_request(grpc_port, qwen_shaped_client):
    """Each opt request with unfiltered sampling moves ~20 MB of probability rows through the
    router; Serve's routing index kept every call (its arguments included) of every ended session,
    so the router's memory grew by that much a request. Now it stays flat."""
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name=APP)

    def router_mib() -> float:
        return router.process_stats.remote().result().rss_bytes / 2**20

    for seed in range(3):  # warm-up: buffers, allocator pools
        qwen_shaped_client.generate(**{**opt_rows_request(5), "seed": seed})
    before = router_mib()
    for seed in range(3, 18):
        qwen_shaped_client.generate(**{**opt_rows_request(5), "seed": seed})
    assert router_mib() - before < 100, "the router kept what 15 requests moved (~300 MB before the fix)"
