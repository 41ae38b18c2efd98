"""lm-evaluation-harness, run unmodified against the served OpenAI API as its docs say for a vLLM
server (`local-completions` with a base URL and nothing else: it finds the served pair's tokenizer
through vLLM's tokenizer routes and sends token-id prompts, as by default): a multiple-choice task scored by log-likelihood (`echo` with `logprobs`) and a generation task, both
from local files. Each choice's log-likelihood lm-eval reports must be the expert's, computed here
in-process; the generations must be the served greedy output. `make tools` installs lm-eval into
its own virtual environment (.tools/lm-eval), apart from the project's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from speccascade.engine.request import GenerationRequest

from .test_guidellm import REPO, installed
from .test_openai_logprobs import expert_prompt_logprobs

LM_EVAL = REPO / ".tools" / "lm-eval" / "bin" / "lm-eval"
QUESTIONS = [  # lm-eval puts a space between question and choice
    {"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "answer": 0},
    {"question": "for i in range(10):\n   ", "choices": ["print(i)", "pass", "break"], "answer": 1},
    {"question": "import", "choices": ["os", "sys", "numpy as np"], "answer": 2},
]
PROMPTS = [{"question": "def fib(n):", "answer": "    return"}, {"question": "class Point:", "answer": "    def"}]
GENERATED_TOKENS = 6


@pytest.fixture(scope="module")
def lm_eval() -> Path:
    return installed(LM_EVAL)


def write_tasks(directory: Path) -> None:
    """Two tasks over local JSON lines (lm-eval's `json` dataset: nothing is downloaded)."""
    for name, rows, task in (
        ("speccascade_choice", QUESTIONS, {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                                           "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}),
        ("speccascade_generate", PROMPTS, {"output_type": "generate_until", "doc_to_target": "{{answer}}",
                                           "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": GENERATED_TOKENS,
                                                                 "do_sample": False, "temperature": 0},
                                           "metric_list": [{"metric": "exact_match"}]}),
    ):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "doc_to_text": "{{question}}", **task}))


def samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def test_lm_eval_scores_and_generates_through_the_served_api(lm_eval, openai_base_url, local_engine, tmp_path):
    tasks, out = tmp_path / "tasks", tmp_path / "out"
    tasks.mkdir()
    write_tasks(tasks)
    model_args = f"model=speccascade,base_url={openai_base_url}/completions"
    command = [str(lm_eval), "run", "--model", "local-completions", "--model_args", model_args,
               "--tasks", "speccascade_choice,speccascade_generate", "--include_path", str(tasks),
               "--output_path", str(out), "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                 "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "remote tokenizer" in result.stdout + result.stderr  # the served pair's, through /tokenize
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert set(results) == {"speccascade_choice", "speccascade_generate"}
    assert 0.0 <= results["speccascade_choice"]["acc,none"] <= 1.0

    tokenizer = local_engine.tokenizer
    choice_samples = samples(out, "speccascade_choice")
    assert len(choice_samples) == len(QUESTIONS)
    for sample, question in zip(choice_samples, QUESTIONS):
        for (context, continuation), response in zip(((a["arg_0"], a["arg_1"]) for a in sample["arguments"].values())
                                                     if isinstance(sample["arguments"], dict)
                                                     else sample["arguments"], sample["resps"]):
            spaces = len(context) - len(context.rstrip())  # lm-eval moves them to the continuation
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            context_length = len(tokenizer.encode(context[:len(context) - spaces], add_special_tokens=False))
            expected = sum(expert_prompt_logprobs(local_engine, whole)[context_length - 1:])
            loglikelihood = float(response[0][0])
            assert loglikelihood == pytest.approx(expected, abs=2e-3), (question["question"], continuation)
    for sample, prompt in zip(samples(out, "speccascade_generate"), PROMPTS):
        (generated,) = sample["resps"][0]
        expected = local_engine.generate(GenerationRequest(prompt=prompt["question"], rule="lossless",
                                                           max_new_tokens=GENERATED_TOKENS, stop=("\n\n",)))
        assert generated == expected.text
