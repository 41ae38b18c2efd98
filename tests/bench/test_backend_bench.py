import asyncio
import json

import pytest
import torch
from speccascade.bench.backend.measure import loop_round_times
from speccascade.bench.backend.steps import IMPLEMENTATIONS
from speccascade.cli import main
from speccascade.engine.backends import backend_class
from speccascade.engine.request import GenerationRequest
from speccascade.engine.roles import LocalDrafter, LocalExpert

from ..conftest import perturbed_copy, tiny_qwen2
from ..engine.test_loop import decode


def test_bench_backend_tiny_measures_every_backend_the_reference_and_the_loop(tmp_path):
    out = tmp_path / "backend.json"
    assert main(["bench", "backend", "--tiny", "--device", "cpu", "--reps", "2", "--loop-rounds", "2",
                 "--contexts", "64", "--batches", "1,2",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["errors"] == []
    steps = report["steps"]
    for model in ("tiny-drafter", "tiny-expert"):
        mine = [s for s in steps if s["model"] == model]
        # hf and static at every (batch, context, tokens); the reference at batch 1, first context.
        assert {(s["batch"], s["context"], s["tokens"]) for s in mine if s["implementation"] == "static"} == {
            (b, 64, t) for b in (1, 2) for t in (1, 6)}
        assert {s["implementation"] for s in mine} == set(IMPLEMENTATIONS)
        assert {(s["batch"], s["context"]) for s in mine if s["implementation"] == "reference"} == {(1, 64)}
        assert all(s["ms_p10"] <= s["ms_median"] <= s["ms_p90"] for s in mine)
    loops = report["loops"]
    assert {(lp["model"], lp["backend"], lp["rule"]) for lp in loops} == {
        (m, b, r) for m in ("tiny-drafter", "tiny-expert") for b in ("hf", "static") for r in ("token", "lossless")}
    assert all(lp["acceptance"] == 1.0 for lp in loops if lp["rule"] == "token")  # pi = q: every token kept
    assert {t["what"].split(":")[1].strip().split(" ")[0] for t in report["targets"]} >= {"static", "loop"}


def test_bench_backend_with_no_loop_rounds_gives_the_step_figures_alone(tmp_path):
    out = tmp_path / "backend.json"
    assert main(["bench", "backend", "--tiny", "--device", "cpu", "--reps", "2", "--loop-rounds", "0",
                 "--contexts", "64", "--batches", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["errors"] == [] and report["loops"] == []
    assert {s["model"] for s in report["steps"]} == {"tiny-drafter", "tiny-expert"}


@pytest.mark.parametrize(("argument", "value"), [
    ("--loop-rounds", "-1"), ("--reps", "0"), ("--gamma", "0"), ("--batches", "1,0"), ("--contexts", "x"),
    ("--contexts", ","),
])
def test_bench_backend_refuses_a_bad_count_naming_it(argument, value, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "backend", "--tiny", "--device", "cpu", argument, value])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert argument in error and repr(value) in error


def test_the_loop_figure_counts_acceptance_over_the_rounds_it_times():
    # The first round prefills and drafts one token (FIRST_BLOCK_SIZE): its time is not a round's,
    # and neither is its one-token acceptance.
    expert_model = tiny_qwen2(500, seed=0)
    drafter_model = perturbed_copy(expert_model, seed=1, scale=0.3)
    request = GenerationRequest(prompt="x", rule="lossless", block_size=4, seed=0, max_new_tokens=200)
    prompt = list(range(20, 60))
    _, records = decode(drafter_model, expert_model, "hf", request, rounds=6, prompt=prompt)
    timed = records[1:]
    expected = sum(r.accepted for r in timed) / sum(r.drafted for r in timed)
    with_first = sum(r.accepted for r in records) / sum(r.drafted for r in records)
    assert records[0].drafted == 1 and with_first != expected  # the first round would move the figure

    hf = backend_class("hf")
    drafter, expert = LocalDrafter(hf(drafter_model, name="drafter")), LocalExpert(hf(expert_model, name="expert"))
    times, acceptance = asyncio.run(loop_round_times(drafter, expert, prompt, request, 6, torch.device("cpu")))
    assert len(times) == 6 and acceptance == pytest.approx(expected)
