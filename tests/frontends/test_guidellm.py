"""guidellm, the load tool of the vLLM ecosystem, run unmodified against the served OpenAI API as
its README says (an `openai_http` backend at the server, synthetic prompts of a fixed length): a
synchronous and a concurrent profile, on chat completions and completions (through
scripts/bench_guidellm.py, the one place that builds guidellm's command lines); every request must
succeed with the output length asked for (guidellm sends `ignore_eos`, `max_completion_tokens`,
text-part content and `stream_options.continuous_usage_stats`). `make tools` installs guidellm
into its own virtual environment (.tools/guidellm), apart from the project's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUIDELLM = REPO / ".tools" / "guidellm" / "bin" / "guidellm"
BENCH_SCRIPT = REPO / "scripts" / "bench_guidellm.py"  # builds and runs guidellm's command lines
OUTPUT_TOKENS = 8


def installed(tool: Path) -> Path:
    """`tool` from `make tools`, or the test is skipped."""
    if not tool.exists():
        pytest.skip(f"{tool.name} is not installed ({tool}; `make tools` installs it)")
    return tool


@pytest.fixture(scope="module")
def guidellm() -> Path:
    return installed(GUIDELLM)


def bench_guidellm(base_url: str, tokenizer_dir: str, out: Path, *options: str) -> subprocess.CompletedProcess:
    """scripts/bench_guidellm.py against the served API (short synthetic prompts), which must succeed."""
    done = subprocess.run([sys.executable, str(BENCH_SCRIPT), "--target", base_url.removesuffix("/v1"),
                           "--tokenizer", tokenizer_dir, "--prompt-tokens", "24", "--output-tokens", str(OUTPUT_TOKENS),
                           "--timeout-s", "600", "--out", str(out), *options],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("request_format", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("streams", ["1", "2"], ids=["synchronous", "concurrent"])
def test_guidellm_runs_unmodified_and_every_request_succeeds(guidellm, openai_base_url, tiny_pair, tmp_path,
                                                            request_format, streams):
    bench_guidellm(openai_base_url, tiny_pair[1], tmp_path, "--methods", "cascade", "--streams", streams,
                   "--requests", "4", "--request-format", request_format)
    report = json.loads((tmp_path / f"cascade-{streams}-streams.json").read_text())
    (benchmark,) = report["benchmarks"]
    totals, scheduler = benchmark["metrics"]["request_totals"], benchmark["scheduler_state"]
    assert totals["errored"] == 0 and totals["incomplete"] == 0 and scheduler["errored_requests"] == 0, totals
    # guidellm (0.8) can close its benchmark while its last request is still being read (its scheduler
    # then says processing: 1) and leave that request out of every count; all it sent is accounted for.
    assert scheduler["created_requests"] == 4
    assert totals["successful"] + scheduler["processing_requests"] == 4 and totals["successful"] >= 3, scheduler
    for request in benchmark["requests"]["successful"]:
        body = json.loads(request["request_args"])["body"]
        assert body["ignore_eos"] is True and body["stream_options"]["continuous_usage_stats"] is True
        assert request["output_tokens"] == OUTPUT_TOKENS  # the length asked for, EOS or not
        assert request["time_to_first_token_ms"] > 0 and request["output"]


def test_the_guidellm_benchmark_script_compares_methods_side_by_side(guidellm, openai_base_url, tiny_pair, tmp_path):
    """scripts/bench_guidellm.py (the BENCHMARKS table's command): one run per method and load,
    expert-only through the request's `method` extra field, one summary row each."""
    out = tmp_path / "guidellm"
    done = bench_guidellm(openai_base_url, tiny_pair[1], out, "--streams", "1,2", "--methods", "cascade,expert",
                          "--requests", "2")
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["method"], r["streams"]) for r in rows] == [("cascade", 1), ("expert", 1), ("cascade", 2),
                                                           ("expert", 2)]
    assert all(r["finished"] == r["total"] >= 2 and r["output_tokens_per_s"] > 0 for r in rows)
    expert = json.loads((out / "expert-2-streams.json").read_text())["benchmarks"][0]["requests"]["successful"]
    assert all(json.loads(r["request_args"])["body"]["method"] == "expert" for r in expert)
    assert "| expert | 2 | 2/2 |" in done.stdout
