"""The decoding loop over local roles, without a tokenizer: round records, and the whole loop on a
GPU (device placement of models, caches, generators and the cascade math)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from speccascade.engine.backends import backend_class
from speccascade.engine.loop import rounds_for
from speccascade.engine.request import GenerationRequest
from speccascade.engine.roles import LocalDrafter, LocalExpert
from speccascade.options import SamplingParams

from ..conftest import perturbed_copy, tiny_qwen2

VOCAB = 500
PROMPT = list(range(20, 60))


def first_rounds(loop, rounds: int) -> list:
    """The first `rounds` records of a decoding loop (an async generator), which is then closed."""
    async def collect():
        records = []
        async for record in loop:
            records.append(record)
            if len(records) == rounds:
                break
        await loop.aclose()
        return records

    return asyncio.run(collect())


def decode(drafter_model, expert_model, kind: str, request: GenerationRequest, rounds: int, **options):
    """(emitted tokens, records) of the first `rounds` rounds."""
    cls = backend_class(kind)
    drafter = LocalDrafter(cls(drafter_model, name="drafter", **options))
    expert = LocalExpert(cls(expert_model, name="expert", **options))
    records = first_rounds(rounds_for(request, drafter, expert, PROMPT, lambda answer: len(answer) >= 12, limit=1000),
                           rounds)
    return [t for r in records for t, _ in r.emitted], records


@pytest.fixture(scope="module")
def models():
    expert = tiny_qwen2(VOCAB, seed=0)
    return perturbed_copy(expert, seed=1, scale=0.1), expert


def test_round_records_count_what_the_round_did(models):
    request = GenerationRequest(prompt="x", rule="lossless", block_size=4, seed=0)
    tokens, records = decode(*models, "hf", request, rounds=10)
    for record in records:
        assert record.drafted == record.drafter_passes == 4 and record.drafter_calls == 1
        assert record.expert_passes == 1 and record.corrected + record.bonus == 1
        assert len(record.emitted) == record.accepted + 1
        assert record.bonus == (record.accepted == 4)
        assert record.wire_bytes == record.context_bytes == 0  # in-process: nothing travels
        # Where the calls' time went: model passes and deciding, inside the calls' wall time.
        assert record.drafter_forward_seconds > 0 and record.expert_forward_seconds > 0
        assert record.drafter_queue_seconds == record.expert_queue_seconds == 0
        assert record.drafter_forward_seconds + record.drafter_decide_seconds <= record.drafter_seconds
        assert record.expert_forward_seconds + record.expert_decide_seconds <= record.expert_seconds
    assert len(tokens) == sum(r.accepted + 1 for r in records)


def test_an_empty_draft_turns_the_round_into_an_expert_step(models):
    """What a drafter tier that is down answers: every method degrades to expert-only decoding."""
    from speccascade.engine.blocks import EMPTY_BLOCK, CallReport

    class DownDrafter:
        async def draft(self, *args):
            return EMPTY_BLOCK, CallReport()

    expert_only, _ = decode(*models, "hf", GenerationRequest(prompt="x", method="expert", seed=0), rounds=8)
    for method in ("cascade", "drafter", "token-cascade", "sequence-cascade"):
        request = GenerationRequest(prompt="x", method=method, rule="chow", alpha=0.5, seed=0)
        expert = LocalExpert(backend_class("hf")(models[1], name="expert"))

        async def collect():
            loop = rounds_for(request, DownDrafter(), expert, PROMPT, lambda answer: len(answer) >= 12, limit=1000)
            out = []
            async for record in loop:
                assert record.drafted == 0 and record.expert_passes == 1
                out += [t for t, _ in record.emitted]
                if len(out) >= 8:
                    break
            await loop.aclose()
            return out

        assert asyncio.run(collect()) == expert_only, method


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["hf", "static"])
def test_the_loop_on_cuda_decodes_greedy_like_the_cpu_and_is_seeded(models, kind):
    greedy = GenerationRequest(prompt="x", rule="lossless", block_size=4, seed=0)
    on_cpu, _ = decode(*models, "hf", greedy, rounds=12)
    on_gpu, records = decode(*(m.cuda() for m in models), kind, greedy, rounds=12)
    assert on_gpu[: len(on_cpu)] == on_cpu[: len(on_gpu)]
    sampled = GenerationRequest(prompt="x", rule="token", alpha=0.3, block_size=4, seed=5,
                                sampling=SamplingParams(temperature=0.7, top_p=0.95))
    first, _ = decode(*(m.cuda() for m in models), kind, sampled, rounds=12)
    second, _ = decode(*(m.cuda() for m in models), kind, sampled, rounds=12)
    assert first == second
    for model in models:
        model.cpu()
