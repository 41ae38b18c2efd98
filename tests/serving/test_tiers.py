"""The tiers driven by hand (no cluster): slim calls answer like whole ones, a replica that lacks a
session's sequence asks for it, and a long prompt is prefilled in chunks while other sessions step."""

from __future__ import annotations

import asyncio

import pytest
from speccascade.config.app import TierConfig
from speccascade.engine.backends import BACKEND_KINDS
from speccascade.engine.blocks import DraftPayload, SampleRows
from speccascade.options import Rule, SamplingParams
from speccascade.serving.direct import DirectServer
from speccascade.serving.tiers import DrafterTier, ExpertTier
from speccascade.serving.wire import GRPC_MESSAGE_BYTES, DraftCall, SentTokens, VerifyCall

GREEDY = SamplingParams()
CONTEXT = [5, 17, 42, 99, 3, 250, 7, 61]


def tier_config(model_dir: str, backend: str, **overrides) -> TierConfig:
    return TierConfig(model=model_dir, dtype="fp32", backend=backend, max_batch_size=4,
                      static={"slots": 4, "cuda_graphs": False}, **overrides)


@pytest.fixture(scope="module", params=BACKEND_KINDS)
def tiers(request, tiny_model_dirs):
    return (DrafterTier(tier_config(tiny_model_dirs[0], request.param, prefill_chunk_tokens=16)),
            ExpertTier(tier_config(tiny_model_dirs[1], request.param)))


def draft(tier, session_id, sent: SentTokens, context, gamma=4, whole=False):
    delta = sent.delta(context, whole=whole)
    reply = asyncio.run(tier.draft(DraftCall(session_id, delta, gamma, GREEDY, 0, DraftPayload(SampleRows.NONE))))
    if not reply.needs_context:
        sent.sent(delta, context)
    return reply


@pytest.mark.parametrize("pass_prompts", [1, 3])
def test_a_prefill_pass_feeds_each_waiting_prompt_a_chunk_up_to_prefill_pass_prompts(tiny_model_dirs, pass_prompts):
    """Three 40-token prompts at once, chunks of 16: with prefill_pass_prompts 3 every pass feeds
    each prompt 16 tokens (16, 32, 40), with 1 a pass feeds 16 tokens in all; the drafts are the
    same either way."""
    drafter = DrafterTier(tier_config(tiny_model_dirs[0], "hf", prefill_chunk_tokens=16,
                                      prefill_pass_prompts=pass_prompts))
    prompts = [[(7 * i + k) % 300 + 3 for i in range(40)] for k in range(3)]
    passes = []
    score = drafter.backend.score
    drafter.backend.score = lambda jobs: (passes.append([len(j.tokens) for j in jobs]), score(jobs))[1]

    async def scenario():
        calls = [drafter.draft(DraftCall(f"p{k}", SentTokens().delta(prompt), 4, GREEDY, 0,
                                         DraftPayload(SampleRows.NONE))) for k, prompt in enumerate(prompts)]
        return [reply.block.tokens for reply in await asyncio.gather(*calls)]

    blocks = asyncio.run(scenario())
    if pass_prompts == 3:
        assert passes[:3] == [[16, 16, 16], [32, 32, 32], [40, 40, 40]]
    else:  # 16 tokens a pass in all, the rest of one prompt's chunk going to the next
        assert passes[:3] == [[16], [32], [40, 8]]
    alone = DrafterTier(tier_config(tiny_model_dirs[0], "hf"))
    assert blocks == [draft(alone, f"a{k}", SentTokens(), prompt).block.tokens for k, prompt in enumerate(prompts)]


@pytest.mark.parametrize("beside_a_stream", [False, True])
def test_a_lone_prompt_takes_the_whole_pass_budget_while_no_stream_decodes(tiny_model_dirs, beside_a_stream):
    """A 40-token prompt, chunks of 16, prefill_pass_prompts 3: with no other session on the
    replica one pass caches all of it; while another session is live there (a stream between its
    steps) 16 tokens a pass. The draft is the same either way."""
    drafter = DrafterTier(tier_config(tiny_model_dirs[0], "hf", prefill_chunk_tokens=16, prefill_pass_prompts=3))
    prompt = [(7 * i) % 300 + 3 for i in range(40)]
    if beside_a_stream:
        draft(drafter, "stream", SentTokens(), CONTEXT)
    passes = []
    score = drafter.backend.score
    drafter.backend.score = lambda jobs: (passes.append([len(j.tokens) for j in jobs]), score(jobs))[1]
    block = draft(drafter, "new", SentTokens(), prompt).block.tokens
    if beside_a_stream:
        assert passes[:3] == [[16], [32], [40]]
    else:  # then the draft's own steps
        assert passes[0] == [40] and [16] not in passes and [32] not in passes
    assert block == draft(DrafterTier(tier_config(tiny_model_dirs[0], "hf")), "alone", SentTokens(), prompt).block.tokens


@pytest.mark.parametrize("released", [True, False])
def test_a_stopping_replica_answers_its_sessions_until_they_end_then_closes_its_direct_channel(tiny_model_dirs,
                                                                                                released):
    """Serve's shutdown hook (`drain`) on a replica called directly: the session held there keeps
    being answered; once its router releases it the drain ends at once, else after
    `drain_timeout_s` with the session counted as still running; either way the channel closes."""
    timeout_s = 30.0 if released else 0.4
    drafter = DrafterTier(tier_config(tiny_model_dirs[0], "hf", drain_timeout_s=timeout_s), direct=True)
    drafter.direct = DirectServer(drafter, host="127.0.0.1", message_bytes=GRPC_MESSAGE_BYTES)

    async def call(sent: SentTokens, context):
        delta = sent.delta(context)
        reply = await drafter.draft(DraftCall("s", delta, 4, GREEDY, 0, DraftPayload(SampleRows.NONE)))
        sent.sent(delta, context)
        return reply

    async def scenario():
        loop, sent = asyncio.get_running_loop(), SentTokens()
        first = await call(sent, CONTEXT)
        assert first.endpoint is not None and drafter.direct._server is not None
        started = loop.time()
        draining = asyncio.create_task(drafter.drain())
        await asyncio.sleep(0.2)
        assert not draining.done()
        again = await call(sent, CONTEXT + list(first.block.tokens[:2]))  # still answered while draining
        assert len(again.block.tokens) == 4
        if released:
            assert await drafter.release("s")
        still_running = await asyncio.wait_for(draining, 10)
        return still_running, loop.time() - started

    still_running, waited = asyncio.run(scenario())
    assert drafter.direct._server is None
    if released:
        assert still_running == 0 and waited < 5
    else:
        assert still_running == 1 and timeout_s <= waited < 5


def test_a_replica_whose_direct_channel_cannot_open_answers_through_serve(tiny_model_dirs, caplog):
    drafter = DrafterTier(tier_config(tiny_model_dirs[0], "hf"), direct=True)
    drafter.direct = DirectServer(drafter, host="192.0.2.1", message_bytes=GRPC_MESSAGE_BYTES)  # not this machine's
    for session_id in ("a", "b"):
        reply = draft(drafter, session_id, SentTokens(), CONTEXT)
        assert len(reply.block.tokens) == 4 and reply.endpoint is None
    assert drafter.direct is None and asyncio.run(drafter.drain()) == 0
    assert sum("direct channel could not open" in record.message for record in caplog.records) == 1


def test_a_replica_called_through_serve_alone_has_nothing_to_drain(tiny_model_dirs):
    drafter = DrafterTier(tier_config(tiny_model_dirs[0], "hf", drain_timeout_s=60))
    draft(drafter, "s", SentTokens(), CONTEXT)
    assert drafter.sessions.live() == ["s"]
    assert asyncio.run(asyncio.wait_for(drafter.drain(), 5)) == 0  # its next call goes elsewhere: no wait


def test_slim_calls_answer_like_whole_ones_and_a_replica_missing_the_sequence_asks_for_it(tiers):
    drafter, expert = tiers
    slim, whole = SentTokens(), SentTokens()
    context = list(CONTEXT)
    for round_ in range(4):
        a = draft(drafter, "slim", slim, context)
        b = draft(drafter, f"whole-{round_}", whole, context, whole=True)  # a fresh session, all of it sent
        assert a.block.tokens == b.block.tokens
        context = context + list(a.block.tokens[:2]) + [round_ + 3]
    # A replica that never saw the session's base sequence: it asks, and the whole sequence works.
    stranger = SentTokens(tokens=list(context[:-1]), version=7)
    assert draft(drafter, "moved", stranger, context).needs_context
    assert draft(drafter, "moved", stranger, context, whole=True).block.tokens == \
        draft(drafter, "fresh", SentTokens(), context).block.tokens
    # The expert verifies a slim call the same way.
    block = draft(drafter, "v", SentTokens(), context).block
    sent = SentTokens()
    sequence = context + list(block.tokens)
    delta = sent.delta(sequence)
    reply = asyncio.run(expert.verify(VerifyCall("v", delta, len(context), block, Rule.LOSSLESS, 0.0, GREEDY, 0)))
    assert reply.outcome is not None and 0 <= reply.outcome.num_accepted <= 4
    assert reply.report.forward_s > 0 and reply.report.wall_s >= reply.report.forward_s
    for tier in tiers:
        for session_id in list(tier.sessions._sessions):
            tier.sessions.release(session_id)


def test_a_long_prompt_is_prefilled_in_chunks_while_another_session_steps(tiers):
    drafter, _ = tiers
    long_prompt = [(7 * i) % 300 + 3 for i in range(120)]
    warm = SentTokens()
    draft(drafter, "stepping", warm, CONTEXT)

    async def scenario():
        done: list[str] = []

        async def one(session_id, sent, context):
            delta = sent.delta(context)
            await drafter.draft(DraftCall(session_id, delta, 4, GREEDY, 0, DraftPayload(SampleRows.NONE)))
            sent.sent(delta, context)
            done.append(session_id)

        long = asyncio.create_task(one("new", SentTokens(), long_prompt))
        await asyncio.sleep(0)
        context = list(CONTEXT)
        for step in range(3):
            context = context + [step + 3]
            await one("stepping", warm, context)
        await long
        return done

    chunk_passes = []
    score = drafter.backend.score
    drafter.backend.score = lambda jobs: (chunk_passes.append([len(j.tokens) for j in jobs]), score(jobs))[1]
    try:
        done = asyncio.run(scenario())
    finally:
        drafter.backend.score = score
    assert done[:3] == ["stepping"] * 3 and done[3] == "new"  # the stream stepped while the prompt was prefilled
    prefill = [lengths[0] for lengths in chunk_passes if len(lengths) == 1 and lengths[0] % 16 == 0]
    assert prefill[:3] == [16, 32, 48]  # one chunk of 16 tokens per pass, never the whole prompt at once
    for session_id in ("new", "stepping"):
        drafter.sessions.release(session_id)


@pytest.mark.parametrize("backend", BACKEND_KINDS)
def test_a_prompt_between_its_prefill_chunks_is_not_evicted_for_the_budget(tiny_model_dirs, backend):
    """The replica over its cache budget evicts after each batch, but never a session whose call
    waits there: evicted, a prompt waiting for (or between) its prefill chunks would go on filling
    a cache the replica no longer holds nor counts, and its next call would send it all again."""
    drafter = DrafterTier(tier_config(tiny_model_dirs[0], backend, prefill_chunk_tokens=16))
    drafter.sessions.budget_bytes = 1  # every session but those kept is evicted after a batch
    long_prompt = [(7 * i) % 300 + 3 for i in range(80)]
    stepping = SentTokens()
    draft(drafter, "stepping", stepping, CONTEXT)

    async def scenario():
        call = DraftCall("new", SentTokens().delta(long_prompt), 4, GREEDY, 0, DraftPayload(SampleRows.NONE))
        new = asyncio.create_task(drafter.draft(call))
        await asyncio.sleep(0)
        context = list(CONTEXT)
        for step in range(3):
            context = context + [step + 3]
            delta = stepping.delta(context)
            await drafter.draft(DraftCall("stepping", delta, 4, GREEDY, 0, DraftPayload(SampleRows.NONE)))
            stepping.sent(delta, context)
        return await new

    reply = asyncio.run(scenario())
    assert "new" in drafter.sessions  # held and counted against the budget, not an orphan
    alone = DrafterTier(tier_config(tiny_model_dirs[0], backend))
    assert reply.block.tokens == draft(alone, "alone", SentTokens(), long_prompt).block.tokens


def test_a_retried_call_supersedes_the_one_still_queued_and_the_session_stays_exact(tiers):
    """A router that timed out sends its call again while the first still queues: the first is
    dropped (its caller is gone), never batched with the retry, which would advance the session's
    cache twice in one pass."""
    drafter, _ = tiers
    context = CONTEXT + [11, 12]
    sent = SentTokens()

    async def scenario():
        delta = sent.delta(context)
        call = DraftCall("retried", delta, 4, GREEDY, 0, DraftPayload(SampleRows.NONE))
        first = asyncio.create_task(drafter.draft(call))
        second = asyncio.create_task(drafter.draft(call))  # TierClient's retry: the same call again
        with pytest.raises(asyncio.CancelledError):
            await first
        block = (await second).block
        sent.sent(delta, context)
        return block

    block = asyncio.run(scenario())
    assert block.tokens == draft(drafter, "fresh-twin", SentTokens(), context).block.tokens
    grown = context + list(block.tokens)  # on the session's cache, the next block is exact
    assert draft(drafter, "retried", sent, grown).block.tokens == \
        draft(drafter, "fresh-grown", SentTokens(), grown).block.tokens
    for session_id in ("retried", "fresh-twin", "fresh-grown"):
        drafter.sessions.release(session_id)
