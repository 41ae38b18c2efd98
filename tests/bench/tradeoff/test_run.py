"""The benchmark loop on tiny random models: every method runs, records are complete, a rerun
skips finished pairs, transformers' assisted generation is wired up like the engine, and the expert
log-likelihood scores the right tokens."""

from __future__ import annotations

import json

import pytest
import torch
from speccascade.bench.humaneval import load_problems
from speccascade.bench.tradeoff.cli import run_benchmark, step_cost_ratio, write_report
from speccascade.bench.tradeoff.configs import METHODS, BenchConfig, build_configs
from speccascade.bench.tradeoff.records import BATCHED_RUNS_FILE, LATENCY_CHECK_FILE, RECORDS_FILE, read_jsonl
from speccascade.bench.tradeoff.run import (
    expert_mean_logprob,
    generate_with_engine,
    generate_with_hf_assisted,
    tokens_covering,
)

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def problems():
    return load_problems(limit=2)


def test_every_method_has_valid_configurations():
    configs = build_configs(block_size=4, max_new_tokens=32)
    assert {c.method for c in configs} == set(METHODS)
    assert {c.sampling for c in configs} == {"greedy", "t0.7-p0.95"}
    assert len({c.key for c in configs}) == len(configs)
    quick = build_configs(block_size=4, max_new_tokens=32, quick=True, samplings=("greedy",))
    assert len(quick) < len(configs) / 3


def test_run_writes_every_pair_and_a_rerun_skips_them(engine, problems, tmp_path):
    configs = build_configs(methods=("expert", "lossless", "token", "hf-assisted", "sequence-cascade"),
                            samplings=("greedy", "t0.7-p0.95"), quick=True, block_size=3,
                            max_new_tokens=MAX_TOKENS)
    ran = run_benchmark(engine, configs, problems, tmp_path, base_seed=7, progress=False)
    assert ran == len(configs) * len(problems)
    records = read_jsonl(tmp_path / RECORDS_FILE)
    assert {(r["config"], r["task_id"]) for r in records} == {(c.key, p.task_id) for c in configs for p in problems}
    for r in records:
        assert 0 < r["generated_tokens"] <= MAX_TOKENS
        assert r["wall_seconds"] > 0
        assert r["expert_passes"] + r["drafter_passes"] > 0
        assert r["outcome"] in ("passed", "failed", "timeout", "memory")
    # Same problem, same seed under every configuration.
    seeds = {r["task_id"]: set() for r in records}
    for r in records:
        seeds[r["task_id"]].add(r["seed"])
    assert all(len(s) == 1 for s in seeds.values())
    assert step_cost_ratio(tmp_path) > 0

    before = (tmp_path / RECORDS_FILE).read_text()
    assert run_benchmark(engine, configs, problems, tmp_path, base_seed=7, progress=False) == 0
    assert (tmp_path / RECORDS_FILE).read_text() == before

    # A new configuration only runs its own pairs; a torn last line is ignored.
    with (tmp_path / RECORDS_FILE).open("a") as f:
        f.write('{"config": "torn')
    more = build_configs(methods=("drafter",), samplings=("greedy",), quick=True, block_size=3,
                         max_new_tokens=MAX_TOKENS)
    assert run_benchmark(engine, configs + more, problems, tmp_path, base_seed=7, progress=False) == len(problems)

    text = write_report(tmp_path)
    assert "## pass@1, greedy" in text and "| token |" in text
    assert (tmp_path / "pass-at-1_greedy.png").exists()
    assert (tmp_path / "mean-logprob_t0.7-p0.95.png").exists()
    summary = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert len(summary) == len(configs) + len(more)


def test_a_batched_run_records_what_a_sequential_one_does_and_checks_its_latency_model(engine, problems,
                                                                                      tmp_path):
    configs = build_configs(methods=("expert", "lossless", "token", "hf-assisted", "chow"),
                            samplings=("greedy", "t0.7-p0.95"), quick=True, block_size=3,
                            max_new_tokens=MAX_TOKENS)
    alone, batched = tmp_path / "alone", tmp_path / "batched"
    run_benchmark(engine, configs, problems, alone, base_seed=7, progress=False)
    ran = run_benchmark(engine, configs, problems, batched, base_seed=7, progress=False, batch=4, latency_sample=3)
    assert ran == len(configs) * len(problems)
    same = ("completion", "generated_tokens", "passed", "drafter_passes", "expert_passes", "seed")
    by_pair = {(r["config"], r["task_id"]): r for r in read_jsonl(alone / RECORDS_FILE)}
    records = read_jsonl(batched / RECORDS_FILE)
    assert len(records) == len(by_pair)
    for r in records:
        assert {k: r[k] for k in same} == {k: by_pair[r["config"], r["task_id"]][k] for k in same}
        assert r["latency"] == ("measured" if r["method"] == "hf-assisted" else "modelled")
        assert r["wall_seconds"] > 0
    (run,) = read_jsonl(batched / BATCHED_RUNS_FILE)
    assert run["requests"] == sum(r["method"] != "hf-assisted" for r in records) and run["failed"] == 0
    assert run["throughput_gain"] > 0 and run["calls_per_batch"]["expert"] > 1
    checks = read_jsonl(batched / LATENCY_CHECK_FILE)
    assert len(checks) == 3 and len({c["config"] for c in checks}) == 3  # configurations in turn
    assert all(c["identical"] and c["modelled_s"] > 0 and c["measured_s"] > 0 for c in checks)
    text = write_report(batched)
    assert "## Batched evaluation" in text and "Latency model check: 3 batched problems" in text
    assert "identical outputs 3/3" in text
    # A rerun skips every pair, batched or not.
    assert run_benchmark(engine, configs, problems, batched, base_seed=7, progress=False, batch=4) == 0


def test_batch_arguments_are_checked(capsys):
    from speccascade.cli import main

    assert main(["bench", "tradeoff", "--batch", "0"]) != 0
    assert "--batch 0" in capsys.readouterr().err
    assert main(["bench", "tradeoff", "--latency-sample", "2"]) != 0
    assert "give --batch N too" in capsys.readouterr().err


def _config(method, *, sampling="greedy", alpha=None, block_size=3, max_new_tokens=MAX_TOKENS):
    return BenchConfig(method, alpha, sampling, block_size, max_new_tokens)


def test_hf_assisted_greedy_matches_expert_greedy_with_fixed_block(engine, problems):
    prompt = problems[0].prompt
    expert = generate_with_engine(engine, _config("expert"), prompt, seed=0)
    assisted = generate_with_hf_assisted(engine, _config("hf-assisted", block_size=3), prompt, seed=0)
    # fp32 tiny models: assisted greedy decoding is lossless.
    assert assisted.token_ids == expert.token_ids
    assert assisted.text == expert.text
    # Constant schedule, no confidence early stop: 3 drafter passes per expert pass at most
    # (the last round may be cut by the token budget).
    assert assisted.expert_passes >= 1
    assert assisted.drafter_passes <= 3 * assisted.expert_passes
    assert assisted.drafter_passes >= 3 * (assisted.expert_passes - 1)
    assert engine.drafter.model.generation_config.num_assistant_tokens == 3


def test_hf_assisted_sampling_is_reproducible_by_seed(engine, problems):
    config = _config("hf-assisted", sampling="t0.7-p0.95")
    first = generate_with_hf_assisted(engine, config, problems[1].prompt, seed=11)
    again = generate_with_hf_assisted(engine, config, problems[1].prompt, seed=11)
    assert first.token_ids == again.token_ids


def test_expert_mean_logprob_scores_each_completion_token(engine, problems):
    prompt_ids = list(engine.tokenizer(problems[0].prompt)["input_ids"])
    completion_ids = [101, 202, 303, 404]
    expected = []
    session = engine.expert.new_session()
    for i, token in enumerate(completion_ids):
        dist = engine.expert.next_distribution(session, prompt_ids + completion_ids[:i])
        expected.append(float(torch.log(dist[token])))
    got = expert_mean_logprob(engine.expert.model, prompt_ids, completion_ids)
    assert got == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert expert_mean_logprob(engine.expert.model, prompt_ids, []) is None


def test_tokens_covering_stops_at_the_kept_text(tokenizer):
    ids = tokenizer("    return x\n\ndef other():\n    pass")["input_ids"]
    kept = "    return x\n"
    covering = tokens_covering(tokenizer, ids, kept)
    assert tokenizer.decode(covering).startswith(kept)
    assert not tokenizer.decode(covering[:-1]).startswith(kept)
    assert tokens_covering(tokenizer, ids, "") == []


def test_alpha_overrides_replace_one_sweep_and_bad_ones_are_named():
    from speccascade.bench.tradeoff.configs import parse_alpha_overrides

    overrides = parse_alpha_overrides(["token=0.1,0.3", "chow=0.5"])
    assert overrides == {"token": (0.1, 0.3), "chow": (0.5,)}
    configs = build_configs(methods=("token", "chow", "opt"), samplings=("greedy",), block_size=5,
                            max_new_tokens=64, alphas=overrides)
    assert [(c.method, c.alpha) for c in configs if c.method != "opt"] == [("token", 0.1), ("token", 0.3),
                                                                           ("chow", 0.5)]
    assert len([c for c in configs if c.method == "opt"]) > 1
    with pytest.raises(ValueError, match="expert=0.1"):
        parse_alpha_overrides(["expert=0.1"])
    with pytest.raises(ValueError, match="lossy"):
        build_configs(methods=("lossy",), samplings=("greedy",), block_size=5, max_new_tokens=64,
                      alphas={"lossy": (1.0,)})


def test_step_cost_calibration_pairs_steps(engine, problems):
    from speccascade.bench.tradeoff.run import measure_step_cost

    calibration = measure_step_cost(engine, problems[0].prompt, steps=4, repeats=2)
    assert calibration["steps"] == 8
    # The tiny drafter is a copy of the tiny expert: the same cost per step, up to timing noise.
    assert 0.3 < calibration["c"] < 3.0
    assert calibration["drafter_step_ms"] > 0 and calibration["expert_step_ms"] > 0
