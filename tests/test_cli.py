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
    (["-n", "4", "--min-tokens", "5"], "min_tokens=5 is out of range: expected 0..max_new_tokens (4)"),
])
def test_generate_rejects_bad_arguments_before_loading_models(argv, fragment, capsys):
    assert main(["generate", "hi", "--drafter", "/nonexistent", *argv]) == 2
    assert fragment in capsys.readouterr().err


def test_generate_takes_vllms_stop_options():
    import argparse

    from speccascade.commands.generate import add_generation_arguments, request_from_args

    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    request = request_from_args(parser.parse_args(["hi", "-n", "9", "--ignore-eos", "--min-tokens", "3",
                                                   "--keep-special-tokens"]))
    assert (request.ignore_eos, request.min_tokens, request.skip_special_tokens) == (True, 3, False)
    defaults = request_from_args(parser.parse_args(["hi"]))
    assert (defaults.ignore_eos, defaults.min_tokens, defaults.skip_special_tokens) == (False, 0, True)
