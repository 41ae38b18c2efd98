"""The decoding loop over local roles, without a tokenizer: round records, and the whole loop on a
GPU (device placement of models, caches, generators and the cascade math)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from speccascade.engine.backends import backend_class
from speccascade.engine.loop import FIRST_BLOCK_SIZE, rounds_for
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


def decode(drafter_model, expert_model, kind: str, request: GenerationRequest, rounds: int, *,
           prompt: list[int] = PROMPT, resumed: bool = False, **options):
    """(emitted tokens, records) of the first `rounds` rounds after `prompt` (`resumed`: it ends with
    output a stream delivered)."""
    cls = backend_class(kind)
    drafter = LocalDrafter(cls(drafter_model, name="drafter", **options))
    expert = LocalExpert(cls(expert_model, name="expert", **options))
    records = first_rounds(rounds_for(request, drafter, expert, prompt, lambda answer: len(answer) >= 12, limit=1000,
                                      resumed=resumed), rounds)
    return [t for r in records for t, _ in r.emitted], records


@pytest.fixture(scope="module")
def models():
    expert = tiny_qwen2(VOCAB, seed=0)
    return perturbed_copy(expert, seed=1, scale=0.1), expert


def test_round_records_count_what_the_round_did(models):
    request = GenerationRequest(prompt="x", rule="lossless", block_size=4, seed=0)
    tokens, records = decode(*models, "hf", request, rounds=10)
    for index, record in enumerate(records):
        gamma = FIRST_BLOCK_SIZE if index == 0 else 4  # the first block is short: the time to the first token
        assert record.drafted == record.drafter_passes == gamma and record.drafter_calls == 1
        assert record.expert_passes == 1 and record.corrected + record.bonus == 1
        assert len(record.emitted) == record.accepted + 1
        assert record.bonus == (record.accepted == gamma)
        assert record.wire_bytes == record.context_bytes == 0  # in-process: nothing travels
        # Where the calls' time went: model passes and deciding, inside the calls' wall time.
        assert record.drafter_forward_seconds > 0 and record.expert_forward_seconds > 0
        assert record.drafter_queue_seconds == record.expert_queue_seconds == 0
        assert record.drafter_forward_seconds + record.drafter_decide_seconds <= record.drafter_seconds
        assert record.expert_forward_seconds + record.expert_decide_seconds <= record.expert_seconds
    assert len(tokens) == sum(r.accepted + 1 for r in records)


@pytest.mark.parametrize("pipeline", ["off", "on"])
def test_the_first_block_is_short_every_later_one_full_and_a_resumed_stream_goes_on_with_full_ones(models, pipeline):
    """The first token waits for one drafted token, not a whole block; blocks drafted ahead of a
    short first block are full ones; greedy output is the expert's whatever the blocks; a stream
    resumed after delivered output drafts the full blocks it would have. Drafting ahead, the expert
    drafts for itself, so that every block drafted ahead is used (the first one included)."""
    pair = models if pipeline == "off" else (models[1], models[1])
    request = GenerationRequest(prompt="x", rule="lossless", block_size=4, seed=0, pipeline=pipeline)
    tokens, records = decode(*pair, "hf", request, rounds=8)
    assert [r.drafted for r in records] == [FIRST_BLOCK_SIZE] + [4] * 7
    if pipeline == "on":
        assert [r.predrafts_used for r in records] == [0] + [1] * 7
        # Counted in the round that uses it: the eighth round's pre-draft, cut off when the caller
        # stopped, is in none, so the hit rate used / made is exact.
        assert [r.predrafts for r in records] == [0] + [1] * 7
    expert_only, _ = decode(*pair, "hf", GenerationRequest(prompt="x", method="expert", seed=0), rounds=len(tokens))
    assert tokens == expert_only
    delivered = [t for t, _ in records[0].emitted]
    after, resumed = decode(*pair, "hf", request, rounds=3, prompt=PROMPT + delivered, resumed=True)
    assert [r.drafted for r in resumed] == [4] * 3
    assert after == tokens[len(delivered):][:len(after)]


def test_an_empty_draft_turns_the_round_into_an_expert_step(models):
    """What a drafter tier that is down answers: every method degrades to expert-only decoding."""
    from speccascade.engine.blocks import EMPTY_BLOCK, CallReport

    class DownDrafter:
        computes_apart = True  # a tier that is down
        overlaps_expert = True

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


class PrefillingExpert(LocalExpert):
    """An expert with compute of its own: `prefill` caches the prompt on the session while the drafter
    drafts (it yields first, as a remote call would), or fails; every call is logged in order."""

    def __init__(self, backend, events: list, *, fails: bool = False):
        super().__init__(backend)
        self.events, self.fails = events, fails

    async def prefill(self, prompt, rule, alpha, sampling, seed):
        from speccascade.engine.backends import ScoreJob
        from speccascade.engine.blocks import CallReport

        self.events.append("prefill sent")
        await asyncio.sleep(0.05)
        if self.fails:
            self.events.append("prefill failed")
            raise RuntimeError("the tier is restarting")
        self.backend.score([ScoreJob(self.session, prompt, len(prompt))])
        self.events.append("prefill done")
        return CallReport(queued_s=0.125, forward_s=0.25)

    async def verify(self, sequence, start, block, *args, **kwargs):
        self.events.append(("verify", len(sequence) - start, self.session.cached_length))
        return await super().verify(sequence, start, block, *args, **kwargs)


class LoggedDrafter(LocalDrafter):
    def __init__(self, backend, events: list):
        super().__init__(backend)
        self.events = events

    async def draft(self, *args):
        self.events.append("draft")
        await asyncio.sleep(0)  # a remote call yields while it waits for its answer
        answer = await super().draft(*args)
        self.events.append("drafted")
        return answer


@pytest.mark.parametrize("fails", [False, True], ids=["prefilled", "prefill failed"])
def test_the_expert_prefills_the_prompt_while_the_first_block_is_drafted(models, fails):
    """The prefill is sent before the first draft; the first verify waits for it (it never overtakes
    it), counts its cost, and the output is the one decoded without it, failed or not."""
    request = GenerationRequest(prompt="x", rule="lossless", block_size=4, seed=0)
    expected, _ = decode(*models, "hf", request, rounds=4)
    events: list = []
    drafter = LoggedDrafter(backend_class("hf")(models[0], name="drafter"), events)
    expert = PrefillingExpert(backend_class("hf")(models[1], name="expert"), events, fails=fails)
    records = first_rounds(rounds_for(request, drafter, expert, PROMPT, lambda answer: False, limit=1000), 4)
    assert [t for r in records for t, _ in r.emitted] == expected
    first_verify = next(i for i, event in enumerate(events) if isinstance(event, tuple))
    assert events[:3] == ["draft", "prefill sent", "drafted"]  # in flight together
    assert events[first_verify - 1] == ("prefill failed" if fails else "prefill done")
    assert events[first_verify][2] == (0 if fails else len(PROMPT))  # the prompt was cached before the verify
    assert events.count("prefill sent") == 1
    assert (records[0].expert_queue_seconds, records[0].expert_forward_seconds >= 0.25) == (
        (0.0, False) if fails else (0.125, True))
    assert records[0].expert_seconds >= 0.04  # the loop waited for the prefill


def test_a_request_closed_before_its_first_verify_cancels_the_prefill(models):
    events: list = []
    request = GenerationRequest(prompt="x", rule="chow", alpha=1.0, block_size=4, seed=0)  # chow never defers
    drafter = LoggedDrafter(backend_class("hf")(models[0], name="drafter"), events)
    expert = PrefillingExpert(backend_class("hf")(models[1], name="expert"), events)

    async def scenario():
        loop = rounds_for(request, drafter, expert, PROMPT, lambda answer: False, limit=1000)
        record = await loop.__anext__()  # kept whole by chow: no verify yet
        assert record.expert_passes == 0
        await loop.aclose()
        await asyncio.sleep(0.1)
        return events

    assert "prefill done" not in asyncio.run(scenario())


def test_the_next_blocks_draft_goes_out_before_the_round_is_yielded_and_closing_cancels_it(models):
    """While the caller takes a round (streams it), a drafter that computes apart already drafts the
    next block: the same call, after the same tokens, so the output is unchanged. A caller that
    stops there closes the loop, which cancels that draft; no draft goes out past the request's
    limit, and none early to an in-process drafter (it would run before the caller's work)."""
    request = GenerationRequest(prompt="x", rule="lossless", block_size=4, seed=0)
    expected, _ = decode(*models, "hf", request, rounds=4)
    events: list = []

    class CancellableDrafter(LoggedDrafter):
        computes_apart = True  # as a tier: its draft runs beside the caller

        async def draft(self, *args):
            try:
                return await super().draft(*args)
            except asyncio.CancelledError:
                self.events.append("draft cancelled")
                raise

    drafter = CancellableDrafter(backend_class("hf")(models[0], name="drafter"), events)
    expert = LocalExpert(backend_class("hf")(models[1], name="expert"))

    async def scenario(limit: int, rounds: int):
        events.clear()
        loop = rounds_for(request, drafter, expert, PROMPT, lambda answer: False, limit=limit)
        emitted, drafts_sent_when_yielded = [], []
        async for record in loop:
            emitted += [t for t, _ in record.emitted]
            drafts_sent_when_yielded.append(events.count("draft"))
            if len(drafts_sent_when_yielded) == rounds:
                break
        await loop.aclose()
        await asyncio.sleep(0)
        return emitted, drafts_sent_when_yielded, list(events)

    emitted, sent, log = asyncio.run(scenario(limit=1000, rounds=4))
    assert emitted == expected
    assert sent == [2, 3, 4, 5]  # each round yielded with the next round's draft already sent
    assert log[-2:] == ["draft", "draft cancelled"] and log.count("drafted") == 4

    emitted, sent, log = asyncio.run(scenario(limit=1, rounds=1))  # the first round reaches the limit
    assert sent == [1] and "draft cancelled" not in log

    drafter.computes_apart = False
    emitted, sent, log = asyncio.run(scenario(limit=1000, rounds=4))
    assert emitted == expected and sent == [1, 2, 3, 4] and "draft cancelled" not in log


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


@pytest.mark.parametrize("overlaps", [True, False], ids=["tiers apart", "passes take turns"])
def test_auto_drafts_ahead_only_where_the_drafters_passes_overlap_the_experts(models, overlaps):
    """A drafter computing apart whose passes can run beside the expert's gets blocks drafted ahead
    under auto; one whose passes take turns with the expert's (tiers on shared cores) gets none,
    and each round says why. The output is the same either way."""
    request = GenerationRequest(prompt="x", rule="token", alpha=1.0, block_size=3, seed=0, pipeline="auto")
    expected, _ = decode(*models, "hf", GenerationRequest(prompt="x", rule="token", alpha=1.0, block_size=3,
                                                          seed=0, pipeline="off"), rounds=6)

    class TierDrafter(LoggedDrafter):
        computes_apart = True
        overlaps_expert = overlaps

    drafter = TierDrafter(backend_class("hf")(models[0], name="drafter"), [])
    expert = LocalExpert(backend_class("hf")(models[1], name="expert"))
    records = first_rounds(rounds_for(request, drafter, expert, PROMPT, lambda answer: len(answer) >= 12,
                                      limit=1000), 6)
    assert [t for r in records for t, _ in r.emitted] == expected
    predrafts = sum(r.predrafts for r in records)
    if overlaps:
        assert predrafts > 0 and records[0].pipeline == "auto: on"
    else:
        assert predrafts == 0 and {r.pipeline for r in records} == {"auto: off, passes cannot overlap"}


def test_a_rejections_pre_draft_that_had_answered_is_counted_as_it_ran():
    """A pre-draft dropped at a rejection after its call answered did its work: its call, passes and
    bytes are counted in the round that drops it, its wasted passes exactly; one still running is
    cancelled and counted at the most it could cost (gamma + 1 passes)."""
    import numpy as np
    from speccascade.engine.blocks import CallReport, DraftedBlock, VerifyOutcome

    class Drafter:
        computes_apart = True
        overlaps_expert = True

        def __init__(self, delay_s: float):
            self.delay_s = delay_s

        async def draft(self, tokens, gamma, sampling, seed, payload):
            if gamma > 1:  # the pre-draft (gamma + 1 after the first block of one)
                await asyncio.sleep(self.delay_s)
            return (DraftedBlock(tokens=tuple(range(7, 7 + gamma)), max_q=np.full(gamma, 0.5, dtype=np.float32)),
                    CallReport(forward_s=0.001, wall_s=0.002, wire_bytes=100))

    class RejectingExpert:
        async def prefill(self, *args):
            return None

        async def verify(self, sequence, start, block, *args, **kwargs):
            await asyncio.sleep(0.02)
            return (VerifyOutcome(num_accepted=0, next_token=3, is_bonus=False, num_deferred=block.gamma),
                    CallReport(wire_bytes=10))

    def second_round(delay_s: float):
        request = GenerationRequest(prompt="x", rule="lossless", block_size=3, seed=0, pipeline="on")

        async def collect():
            loop = rounds_for(request, Drafter(delay_s), RejectingExpert(), PROMPT, lambda answer: False, limit=1000)
            records = [await anext(loop) for _ in range(2)]
            await loop.aclose()
            return records[1]

        return asyncio.run(collect())

    answered = second_round(delay_s=0.0)  # done before the verify's answer
    assert (answered.predrafts, answered.predrafts_wasted, answered.predraft_wasted_passes) == (1, 1, 4)
    assert answered.drafter_calls == 2 and answered.drafter_passes == 4 + 3  # the pre-draft's and the round's draft
    assert answered.wire_bytes == 100 + 100 + 10
    running = second_round(delay_s=1.0)  # still drafting when the verify rejects
    assert (running.predrafts, running.predrafts_wasted, running.predraft_wasted_passes) == (1, 1, 4)
    assert running.drafter_calls == 1 and running.wire_bytes == 100 + 10
