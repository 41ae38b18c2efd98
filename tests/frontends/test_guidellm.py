"""guidellm, the load tool of the vLLM ecosystem, run unmodified against the served OpenAI API as
its README says (an `openai_http` backend at the server, synthetic prompts of a fixed length): a
synchronous and a concurrent profile, on chat completions and completions; every request must
succeed with the output length asked for (guidellm sends `ignore_eos`, `max_completion_tokens`,
text-part content and `stream_options.continuous_usage_stats`). `make tools` installs guidellm
into its own virtual environment (.tools/guidellm), apart from the project's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

GUIDELLM = Path(__file__).resolve().parents[2] / ".tools" / "guidellm" / "bin" / "guidellm"
OUTPUT_TOKENS = 8


@pytest.fixture(scope="module")
def guidellm() -> Path:
    if not GUIDELLM.exists():
        pytest.skip(f"guidellm is not installed ({GUIDELLM}; `make tools` installs it)")
    return GUIDELLM


def run_guidellm(guidellm: Path, base_url: str, tokenizer_dir: str, out: Path, *, request_format: str,
                 profile: str) -> dict:
    target = base_url.removesuffix("/v1")
    command = [
        str(guidellm), "run",
        "--backend", f"kind=openai_http,target={target},request_format={request_format}",
        "--profile", profile,
        "--constraint", "kind=max_requests,count=4",
        "--data", f"kind=synthetic_text,prompt_tokens=24,output_tokens={OUTPUT_TOKENS}",
        "--tokenizer", f"kind=hf_auto,model={tokenizer_dir}",
        "--output", f"kind=json,path={out}",
        "--disable-progress",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(out.parent)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("request_format", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("profile", ["kind=synchronous", "kind=concurrent,streams=2"], ids=["synchronous", "concurrent"])
def test_guidellm_runs_unmodified_and_every_request_succeeds(guidellm, openai_base_url, tiny_pair, tmp_path,
                                                            request_format, profile):
    report = run_guidellm(guidellm, openai_base_url, tiny_pair[1], tmp_path / "report.json",
                          request_format=request_format, profile=profile)
    (benchmark,) = report["benchmarks"]
    assert benchmark["metrics"]["request_totals"] == {"successful": 4, "errored": 0, "incomplete": 0, "total": 4}
    for request in benchmark["requests"]["successful"]:
        body = json.loads(request["request_args"])["body"]
        assert body["ignore_eos"] is True and body["stream_options"]["continuous_usage_stats"] is True
        assert request["output_tokens"] == OUTPUT_TOKENS  # the length asked for, EOS or not
        assert request["time_to_first_token_ms"] > 0 and request["output"]


def test_the_guidellm_benchmark_script_compares_methods_side_by_side(guidellm, openai_base_url, tiny_pair, tmp_path):
    """scripts/bench_guidellm.py (the BENCHMARKS table's command): one run per method and load,
    expert-only through the request's `method` extra field, one summary row each."""
    import sys

    out = tmp_path / "guidellm"
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_guidellm.py"
    done = subprocess.run([sys.executable, str(script), "--target", openai_base_url.removesuffix("/v1"),
                           "--tokenizer", tiny_pair[1], "--streams", "1,2", "--methods", "cascade,expert",
                           "--requests", "2", "--prompt-tokens", "24", "--output-tokens", str(OUTPUT_TOKENS),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["method"], r["streams"]) for r in rows] == [("cascade", 1), ("expert", 1), ("cascade", 2),
                                                           ("expert", 2)]
    assert all(r["finished"] == r["total"] >= 2 and r["output_tokens_per_s"] > 0 for r in rows)
    expert = json.loads((out / "expert-2-streams.json").read_text())["benchmarks"][0]["requests"]["successful"]
    assert all(json.loads(r["request_args"])["body"]["method"] == "expert" for r in expert)
    assert "| expert | 2 | 2/2 |" in done.stdout
