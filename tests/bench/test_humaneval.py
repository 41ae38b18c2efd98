"""HumanEval loading, stop sequences and the sandboxed test runner."""

from __future__ import annotations

import time

import pytest
from speccascade.bench.humaneval import (
    Outcome,
    check_completion,
    load_problems,
    run_sandboxed,
    truncate_at_stop,
)


@pytest.fixture(scope="module")
def problems():
    return load_problems(limit=3)


def test_load_problems_in_dataset_order_with_limit(problems):
    assert [p.task_id for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(load_problems()) == 164
    with pytest.raises(ValueError, match="limit=0"):
        load_problems(0)


def test_truncate_at_earliest_stop_sequence():
    text = "    return x\n\n# a comment\ndef other():\n    pass"
    assert truncate_at_stop(text) == "    return x\n"
    assert truncate_at_stop("    return 1\nif __name__ == '__main__':\n") == "    return 1"
    assert truncate_at_stop("    return 1") == "    return 1"


def test_canonical_solution_passes(problems):
    for problem in problems:
        result = check_completion(problem, problem.canonical_solution)
        assert result.outcome is Outcome.PASSED, result.detail


def test_wrong_solution_fails(problems):
    result = check_completion(problems[0], "    return True\n")
    assert result.outcome is Outcome.FAILED
    assert "AssertionError" in result.detail


def test_syntax_error_fails(problems):
    assert check_completion(problems[0], "    return (\n").outcome is Outcome.FAILED


def test_infinite_loop_is_killed_within_timeout():
    started = time.perf_counter()
    result = run_sandboxed("while True:\n    pass\n", timeout=1.5)
    elapsed = time.perf_counter() - started
    assert result.outcome is Outcome.TIMEOUT
    assert elapsed < 4.0


def test_sleeping_child_process_is_killed_with_its_parent():
    # The child forks a sleeper and waits on it: the timeout must not wait for the grandchild.
    source = "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    started = time.perf_counter()
    result = run_sandboxed(source, timeout=1.5)
    assert result.outcome is Outcome.TIMEOUT
    assert time.perf_counter() - started < 4.0


def test_memory_hog_hits_its_limit():
    source = "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n"
    started = time.perf_counter()
    result = run_sandboxed(source, timeout=20, memory_mb=256)
    assert result.outcome is Outcome.MEMORY
    assert time.perf_counter() - started < 10


def test_program_runs_in_an_empty_directory():
    assert run_sandboxed("import os\nassert os.listdir('.') == ['candidate.py']\n").passed


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"memory_mb": 8}])
def test_bad_limits_are_rejected(kwargs):
    with pytest.raises(ValueError):
        run_sandboxed("pass\n", **kwargs)
