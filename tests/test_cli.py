import json

import pytest
from speccascade.cli import main


def test_generate_json_output(tiny_model_dirs, capsys):
    drafter, expert = tiny_model_dirs
    code = main(["generate", "def f(x):", "--raw", "--drafter", drafter, "--expert", expert, "--dtype", "fp32",
                 "-n", "7", "--rule", "lossless", "--seed", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 7 and out["finish_reason"] == "length" and out["seed"] == 3
    assert out["stats"]["tokens_from_drafter"] + out["stats"]["tokens_from_expert"] == 7


def test_generate_streams_text_and_stats(tiny_model_dirs, capsys):
    drafter, expert = tiny_model_dirs
    assert main(["generate", "hello there", "--drafter", drafter, "--expert", expert, "-n", "5", "--no-color"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # streamed text
    assert "deferred positions" in captured.err and "drafter" in captured.err


@pytest.mark.parametrize("argv,fragment", [
    (["--alpha", "nan"], "alpha must be a number"),
    (["-g", "0"], "block_size=0 is out of range"),
    (["--rule", "token", "--alpha", "1.5"], "alpha=1.5 is out of range for rule 'token'"),
    (["--top-p", "0"], "top_p must be in"),
])
def test_generate_rejects_bad_arguments_before_loading_models(argv, fragment, capsys):
    assert main(["generate", "hi", "--drafter", "/nonexistent", *argv]) == 2
    assert fragment in capsys.readouterr().err
