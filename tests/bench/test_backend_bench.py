import json

import pytest
from speccascade.bench.backend.steps import IMPLEMENTATIONS
from speccascade.cli import main


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
