import pytest
import torch
from speccascade.engine.loop import FIRST_BLOCK_SIZE
from speccascade.engine.request import GenerationRequest
from speccascade.engine.stats import Source
from speccascade.options import Method, SamplingParams

from ..conftest import make_engine

PROMPTS = ["def add(a, b):", "import numpy as np\n\n# Compute the mean of a list of numbers, then print it\n" * 3]
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95)


def run(engine, prompt=PROMPTS[0], **kwargs):
    kwargs.setdefault("max_new_tokens", 24)
    kwargs.setdefault("seed", 0)
    return engine.generate(GenerationRequest(prompt=prompt, **kwargs))


def expert_greedy_reference(engine, prompt, n):
    """The expert's own greedy output via Hugging Face generate (no cache tricks of ours)."""
    ids = torch.tensor([engine.encode(GenerationRequest(prompt=prompt))])
    out = engine.expert.model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("gamma", [1, 3, 8])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "long"])
def test_greedy_lossless_equals_expert_greedy(engine, gamma, prompt):
    result = run(engine, prompt, rule="lossless", block_size=gamma, max_new_tokens=30)
    assert result.token_ids == expert_greedy_reference(engine, prompt, 30)
    assert result.stats.accepted > 0  # the drafter's tokens were really used
    assert result.stats.expert_passes < 30


def test_expert_only_baseline_equals_expert_greedy(engine):
    assert run(engine, method="expert", max_new_tokens=30).token_ids == expert_greedy_reference(engine, PROMPTS[0], 30)


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_chow_never_defer_end_equals_drafter_only_and_skips_the_expert(engine, sampling):
    cascade = run(engine, rule="chow", alpha=1.0, sampling=sampling, seed=7)
    drafter_only = run(engine, method="drafter", sampling=sampling, seed=7)
    assert cascade.token_ids == drafter_only.token_ids
    assert cascade.stats.expert_passes == 0 and cascade.stats.skipped_blocks > 0
    assert set(cascade.sources) == {Source.DRAFTER}


@pytest.mark.parametrize("rule,alpha", [("chow", 0.0), ("diff", -1.0), ("lossy", 0.0)])
def test_always_defer_end_equals_lossless(engine, rule, alpha):
    lossless = run(engine, rule="lossless", max_new_tokens=30)
    assert run(engine, rule=rule, alpha=alpha, max_new_tokens=30).token_ids == lossless.token_ids


@pytest.mark.parametrize("rule", ["token", "chow", "opt", "lossy"])
def test_same_seed_same_output(engine, rule):
    alpha = 0.3
    a = run(engine, rule=rule, alpha=alpha, sampling=SAMPLED, seed=123)
    b = run(engine, rule=rule, alpha=alpha, sampling=SAMPLED, seed=123)
    assert a.token_ids == b.token_ids and a.text == b.text
    others = {tuple(run(engine, rule=rule, alpha=alpha, sampling=SAMPLED, seed=s).token_ids) for s in (1, 2, 3)}
    assert len(others | {tuple(a.token_ids)}) > 1


def test_lenient_token_rule_keeps_more_drafter_tokens_than_lossless(engine):
    lossless = run(engine, rule="lossless", max_new_tokens=60)
    lenient = run(engine, rule="token", alpha=0.9, max_new_tokens=60)
    assert lenient.stats.tokens_from_drafter > lossless.stats.tokens_from_drafter
    assert lenient.stats.deferred < lenient.stats.drafted


def test_stats_add_up(engine):
    r = run(engine, rule="opt", alpha=0.2, sampling=SAMPLED, max_new_tokens=50)
    s = r.stats
    assert len(r.token_ids) == len(r.sources) == s.tokens_from_drafter + s.tokens_from_expert
    assert s.tokens_from_drafter == r.sources.count(Source.DRAFTER)
    # The first block is FIRST_BLOCK_SIZE tokens (the time to the first token), every later one 5.
    assert s.accepted <= s.drafted == s.drafter_passes == FIRST_BLOCK_SIZE + (s.rounds - 1) * 5
    assert s.expert_passes == s.rounds == s.corrected + s.bonus
    assert s.tokens_from_expert <= s.corrected + s.bonus
    assert s.wall_seconds >= s.drafter_seconds + s.expert_seconds > 0


def test_max_new_tokens_is_exact(engine):
    r = run(engine, rule="token", max_new_tokens=13)
    assert len(r.token_ids) == 13 and r.finish_reason == "length"


def test_stop_string_cuts_the_text_and_finishes(engine):
    full = run(engine, rule="lossless", max_new_tokens=40)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip(), full.text
    r = run(engine, rule="lossless", max_new_tokens=40, stop=(stop,))
    assert r.finish_reason == "stop"
    assert r.text == full.text[: full.text.index(stop)]


def test_eos_finishes_without_being_emitted(tokenizer):
    engine = make_engine(tokenizer)
    full = run(engine, rule="lossless", max_new_tokens=20)
    eos = full.token_ids[5]
    engine.eos_ids = frozenset({eos})
    r = run(engine, rule="lossless", max_new_tokens=20)
    assert r.finish_reason == "stop"
    assert r.token_ids == full.token_ids[: full.token_ids.index(eos)]


def test_stream_chunks_add_up_to_the_result(engine):
    chunks = list(engine.stream(GenerationRequest(prompt=PROMPTS[0], rule="token", max_new_tokens=40, seed=0)))
    result = chunks[-1].result
    assert result is not None and all(c.result is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert [s for c in chunks for s in c.sources] == result.sources
    assert {seg.source for c in chunks for seg in c.segments} == {Source.DRAFTER, Source.EXPERT}


def test_chat_messages_use_the_chat_template(engine):
    request = GenerationRequest(messages=[{"role": "user", "content": "Say hi"}], max_new_tokens=5)
    prompt = engine.tokenizer.decode(engine.encode(request))
    assert "<|im_start|>user\nSay hi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert len(engine.generate(request).token_ids) == 5


@pytest.mark.parametrize("method", [m for m in Method if m is not Method.CASCADE])
def test_every_baseline_runs(engine, method):
    r = run(engine, method=method, alpha=0.5, max_new_tokens=12)
    assert len(r.token_ids) == 12


def test_sequence_cascade_defers_the_whole_answer_when_unsure(engine):
    drafter = run(engine, method="drafter", max_new_tokens=12)
    expert = run(engine, method="expert", max_new_tokens=12)
    assert run(engine, method="sequence-cascade", alpha=1.0, max_new_tokens=12).token_ids == drafter.token_ids
    assert run(engine, method="sequence-cascade", alpha=0.0, max_new_tokens=12).token_ids == expert.token_ids


@pytest.mark.parametrize("kwargs,fragment", [
    ({"rule": "nope"}, "unknown rule 'nope'"),
    ({"alpha": float("nan")}, "alpha must be a number"),
    ({"rule": "chow", "alpha": 2.0}, "alpha=2.0 is out of range for rule 'chow'"),
    ({"block_size": 0}, "block_size=0 is out of range"),
    ({"block_size": 10_000}, "block_size=10000 is out of range"),
    ({"max_new_tokens": 0}, "max_new_tokens=0 is out of range"),
    ({"prompt": "   "}, "prompt must be non-empty"),
    ({"method": "beam"}, "unknown method 'beam'"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
    ({"seed": -1}, "seed must be an integer"),
])
def test_bad_requests_name_the_bad_value(kwargs, fragment):
    kwargs.setdefault("prompt", "hello")
    with pytest.raises(ValueError, match=fragment):
        GenerationRequest(**kwargs)


def test_a_token_id_prompt_generates_what_its_text_does(engine):
    text = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=12, rule="lossless")
    ids = engine.encode(text)
    by_ids = GenerationRequest(prompt_token_ids=ids, max_new_tokens=12, rule="lossless")
    assert engine.encode(by_ids) == ids  # taken as given, nothing added
    assert engine.generate(by_ids).token_ids == engine.generate(text).token_ids


@pytest.mark.parametrize("kwargs,fragment", [
    ({"prompt_token_ids": []}, r"prompt_token_ids must hold at least one token id"),
    ({"prompt_token_ids": [1, -2]}, r"prompt_token_ids\[1\]=-2 is not a token id"),
    ({"prompt_token_ids": [1, True]}, r"prompt_token_ids\[1\]=True is not a token id"),
    ({"prompt_token_ids": "12"}, r"prompt_token_ids must be a list of token ids"),
    ({"prompt_token_ids": [1], "prompt": "hi"}, r"give exactly one of prompt, messages or prompt_token_ids"),
])
def test_bad_token_id_prompts_name_the_bad_value(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        GenerationRequest(**kwargs)


def test_a_token_id_outside_the_vocabulary_is_refused(engine):
    vocabulary = len(engine.tokenizer)
    with pytest.raises(ValueError, match=rf"prompt_token_ids\[1\]={vocabulary} is outside the vocabulary: .* "
                                         rf"0\.\.{vocabulary - 1}"):
        engine.encode(GenerationRequest(prompt_token_ids=[1, vocabulary]))


def test_prompt_longer_than_the_context_window_is_refused(engine):
    long_prompt = "word " * 600  # the tiny models have a 512-token window
    with pytest.raises(ValueError, match=r"prompt of \d+ tokens is too long: the context window is 512"):
        run(engine, long_prompt)


def test_generation_stops_at_the_context_window(engine):
    prompt = "word " * 480
    r = run(engine, prompt, max_new_tokens=100, block_size=4)
    assert r.finish_reason == "length"
    assert r.prompt_tokens + len(r.token_ids) <= 512 - 5


@pytest.fixture(scope="module")
def static_engine(tokenizer):
    return make_engine(tokenizer, backend="static")


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("method,rule,alpha", [
    ("cascade", "lossless", 0.0), ("cascade", "chow", 0.3), ("cascade", "diff", 0.1), ("cascade", "opt", 0.3),
    ("cascade", "token", 0.3), ("cascade", "lossy", 0.3), ("expert", "token", 0.5), ("drafter", "token", 0.5),
    ("token-cascade", "token", 0.3), ("sequence-cascade", "token", 0.3),
])
def test_static_backend_decodes_like_hf(engine, static_engine, method, rule, alpha, sampling):
    options = dict(method=method, rule=rule, alpha=alpha, sampling=sampling, seed=11, max_new_tokens=30)
    expected, got = run(engine, **options), run(static_engine, **options)
    assert got.token_ids == expected.token_ids
    assert got.sources == expected.sources


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED, SamplingParams(temperature=1.0)],
                         ids=["greedy", "top-p", "temperature"])
@pytest.mark.parametrize("rule,alpha", [("lossless", 0.0), ("chow", 0.3), ("diff", 0.1), ("opt", 0.3), ("token", 0.3),
                                        ("token", 0.9), ("lossy", 0.3)])
def test_pipelining_changes_nothing_in_the_output(engine, rule, alpha, sampling):
    """A block drafted ahead is drawn with the keys a draft after the verdict would use: with
    pipelining on, off or auto the output is token for token the same, greedy and sampled."""
    options = dict(rule=rule, alpha=alpha, sampling=sampling, seed=5, max_new_tokens=40, block_size=3)
    off = run(engine, pipeline="off", **options)
    on = run(engine, pipeline="on", **options)
    auto = run(engine, pipeline="auto", **options)
    assert on.token_ids == off.token_ids == auto.token_ids
    assert on.sources == off.sources
    assert off.stats.predrafts == 0
    if rule != "chow":  # every verified round drafts ahead; used ones save a draft call
        assert on.stats.predrafts > 0
        assert on.stats.predrafts_used + on.stats.predrafts_wasted == on.stats.predrafts
        assert on.stats.drafted == off.stats.drafted  # the blocks verified are the same blocks
    assert on.stats.rounds == off.stats.rounds


def test_a_lenient_rule_uses_most_of_its_pre_drafts(engine):
    """token at alpha = 1 keeps every drafted token, so a pre-draft hits whenever the drafter
    guesses the expert's bonus token."""
    result = run(engine, rule="token", alpha=1.0, block_size=3, max_new_tokens=60, pipeline="on")
    assert result.stats.predrafts_used >= 1
    assert result.stats.predraft_wasted_passes == 4 * result.stats.predrafts_wasted


# ------------------------------------------------------------- vLLM's ignore_eos, min_tokens, skip_special_tokens

def engine_with_early_eos(tokenizer, n: int = 20, eos_index: int = 5):
    """An engine whose EOS is the token its lossless greedy output has at `eos_index` (first seen
    there): (engine, the full output without that EOS, the EOS id)."""
    engine = make_engine(tokenizer)
    full = run(engine, rule="lossless", max_new_tokens=n)
    eos = full.token_ids[eos_index]
    assert full.token_ids.index(eos) == eos_index, "the tiny model's token appears earlier: pick another index"
    engine.eos_ids = frozenset({eos})
    return engine, full, eos


@pytest.mark.parametrize("method,rule,alpha,sampling", [
    ("cascade", "lossless", 0.0, SamplingParams()), ("cascade", "token", 0.3, SAMPLED),
    ("cascade", "chow", 0.3, SamplingParams()), ("expert", "lossless", 0.0, SAMPLED),
    ("sequence-cascade", "lossless", 0.3, SamplingParams()),
])
def test_ignore_eos_runs_to_max_new_tokens_with_the_eos_kept(tokenizer, method, rule, alpha, sampling):
    engine = make_engine(tokenizer)
    options = dict(method=method, rule=rule, alpha=alpha, sampling=sampling, seed=3, max_new_tokens=20)
    full = run(engine, **options)
    eos = full.token_ids[4]
    engine.eos_ids = frozenset({eos})
    stopped = run(engine, **options)
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < 20
    ignored = run(engine, ignore_eos=True, **options)
    # The same draws as without any EOS: the EOS is an output token like any other.
    assert ignored.token_ids == full.token_ids and ignored.text == full.text
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 20


def test_min_tokens_masks_eos_as_hugging_face_min_new_tokens_does(tokenizer):
    """Greedy lossless cascade with min_tokens: the expert's greedy output with the EOS logit masked
    for the first min_tokens tokens (HF's MinNewTokensLengthLogitsProcessor, vLLM's min_tokens)."""
    engine, full, eos = engine_with_early_eos(tokenizer)
    ids = torch.tensor([engine.encode(GenerationRequest(prompt=PROMPTS[0]))])
    reference = engine.expert.model.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=10,
                                             eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:].tolist()
    reference = reference[: reference.index(eos)] if eos in reference else reference
    assert reference[:5] == full.token_ids[:5] and reference[5] != eos  # the mask changed the output
    for gamma in (1, 4):
        result = run(engine, rule="lossless", block_size=gamma, max_new_tokens=20, min_tokens=10)
        assert result.token_ids == reference
        assert eos not in result.token_ids[:10] and len(result.token_ids) >= 10


@pytest.mark.parametrize("method,rule,alpha", [("cascade", "token", 0.3), ("cascade", "chow", 0.5),
                                               ("drafter", "lossless", 0.0), ("token-cascade", "lossless", 0.3),
                                               ("sequence-cascade", "lossless", 0.5)])
def test_min_tokens_holds_for_every_method_and_sampling(tokenizer, method, rule, alpha):
    engine = make_engine(tokenizer)
    for sampling in (SamplingParams(), SAMPLED):
        options = dict(method=method, rule=rule, alpha=alpha, sampling=sampling, seed=5, max_new_tokens=16)
        full = run(engine, **options)
        engine.eos_ids = frozenset({full.token_ids[2]})
        result = run(engine, min_tokens=12, **options)
        assert len(result.token_ids) >= 12 and not set(result.token_ids[:12]) & engine.eos_ids
        engine.eos_ids = frozenset()


def test_min_tokens_defers_stop_strings_as_vllm_does(engine):
    full = run(engine, rule="lossless", max_new_tokens=30)
    stop = full.text[len(full.text) // 3: len(full.text) // 3 + 3]
    cut = run(engine, rule="lossless", max_new_tokens=30, stop=(stop,))
    assert cut.finish_reason == "stop"
    # No stop string ends the output before min_tokens; one seen before then is not searched again.
    held = run(engine, rule="lossless", max_new_tokens=30, stop=(stop,), min_tokens=30)
    assert held.token_ids == full.token_ids and held.finish_reason == "length"


def test_skip_special_tokens_decides_whether_special_tokens_are_text(tokenizer):
    from speccascade.engine.text import OutputBuilder

    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    words = tokenizer("hello world")["input_ids"]
    texts = {}
    for skip in (True, False):
        builder = OutputBuilder(tokenizer, eos_ids=frozenset({special}), max_new_tokens=10, ignore_eos=True,
                                skip_special_tokens=skip)
        for token in [*words, special, *words]:
            builder.add(token, Source.EXPERT)
        assert builder.tokens == [*words, special, *words] and not builder.finished
        texts[skip] = builder.text
    assert texts[True] == "hello worldhello world"
    assert texts[False] == "hello world<|im_end|>hello world"


@pytest.mark.parametrize("kwargs,fragment", [
    ({"min_tokens": -1}, r"min_tokens=-1 is out of range: expected 0..max_new_tokens \(8\)"),
    ({"min_tokens": 9}, r"min_tokens=9 is out of range: expected 0..max_new_tokens \(8\)"),
    ({"min_tokens": 2.5}, "min_tokens must be an integer"),
    ({"ignore_eos": "yes"}, "ignore_eos must be true or false"),
    ({"skip_special_tokens": 1}, "skip_special_tokens must be true or false"),
])
def test_bad_vllm_extension_values_are_refused_by_name(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        GenerationRequest(prompt="hello", max_new_tokens=8, **kwargs)
