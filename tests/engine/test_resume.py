"""Resumable streams in-process: a stream cut after any of its chunks and continued from the
output it delivered (`delivered`) sends exactly the chunks the unbroken stream sent next."""

import pytest
from speccascade.engine.request import GenerationRequest
from speccascade.options import SamplingParams

PROMPT = "def add(a, b):"
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95)


def chunks_of(engine, request, delivered=()):
    return list(engine.stream(request, delivered))


def assert_resumes_exactly(engine, request):
    full = chunks_of(engine, request)
    assert len(full) >= 3, "too short a stream to cut"
    whole = full[-1].result
    tried = set()
    for cut in range(len(full)):  # cut after `cut` chunks (0: nothing delivered yet)
        delivered = [t for chunk in full[:cut] for t in chunk.token_ids]
        if len(delivered) in tried:  # after a chunk with no tokens: the same resumption as before it
            continue
        tried.add(len(delivered))
        resumed = chunks_of(engine, request, delivered)
        # The continued stream is the rest of the unbroken one, chunk for chunk (with no output
        # delivered yet, it starts over: the sequence cascade's drafting rounds send empty chunks).
        rest = full[cut:] if delivered else full
        assert [c.token_ids for c in resumed] == [c.token_ids for c in rest], cut
        assert [c.text for c in resumed] == [c.text for c in rest], cut
        assert [c.sources for c in resumed[:-1]] == [c.sources for c in rest[:-1]], cut
        result = resumed[-1].result
        assert result.token_ids == whole.token_ids and result.text == whole.text, cut
        assert result.finish_reason == whole.finish_reason and result.seed == whole.seed


@pytest.mark.parametrize("method,rule,alpha", [
    ("cascade", "lossless", 0.0), ("cascade", "chow", 0.3), ("cascade", "token", 0.3), ("cascade", "lossy", 0.3),
    ("cascade", "opt", 0.3), ("expert", "lossless", 0.0), ("drafter", "lossless", 0.0),
    ("token-cascade", "lossless", 0.3), ("sequence-cascade", "lossless", 0.3), ("sequence-cascade", "lossless", 0.0),
])
@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_a_stream_cut_after_any_chunk_continues_token_identically(engine, method, rule, alpha, sampling):
    request = GenerationRequest(prompt=PROMPT, method=method, rule=rule, alpha=alpha, sampling=sampling, seed=11,
                                block_size=3, max_new_tokens=20, ignore_eos=True)
    assert_resumes_exactly(engine, request)


@pytest.mark.parametrize("pipeline", ["on", "off"])
def test_pipelining_and_block_size_keep_resumption_exact(engine, pipeline):
    request = GenerationRequest(prompt=PROMPT, rule="token", alpha=0.2, sampling=SAMPLED, seed=5, block_size=5,
                                max_new_tokens=24, pipeline=pipeline, ignore_eos=True)
    assert_resumes_exactly(engine, request)


def test_stop_strings_min_tokens_and_held_back_text_resume_exactly(engine):
    full = engine.generate(GenerationRequest(prompt=PROMPT, rule="lossless", seed=2, max_new_tokens=24,
                                             ignore_eos=True))
    stop = full.text[len(full.text) // 2:][:3]  # a stop string the output reaches midway
    request = GenerationRequest(prompt=PROMPT, rule="chow", alpha=0.2, seed=2, max_new_tokens=24, stop=(stop,),
                                min_tokens=2, block_size=2)
    assert_resumes_exactly(engine, request)


def test_resuming_a_finished_output_only_ends_it(engine):
    request = GenerationRequest(prompt=PROMPT, seed=1, max_new_tokens=6, ignore_eos=True)
    whole = engine.generate(request)
    assert whole.finish_reason == "length"
    (last,) = chunks_of(engine, request, whole.token_ids)
    assert last.token_ids == [] and last.result.token_ids == whole.token_ids
    assert last.result.finish_reason == "length" and last.result.stats.rounds == 0
