"""`speccascade bench serve` on tiny models: it starts the application (in a child process, with
its own Ray cluster), pairs in-process and served requests prompt by prompt, and the fp32 outputs
agree token for token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .test_soak_bench import REPO, free_port


def test_bench_serve_on_tiny_models_pairs_in_process_and_served_requests(tiny_model_dirs, tmp_path):
    drafter, expert = tiny_model_dirs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "services"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "serve.json"
    command = [sys.executable, "-m", "speccascade.cli", "bench", "serve", "--drafter", drafter, "--expert", expert,
               "--dtype", "fp32", "--prompts", "2", "--max-new-tokens", "12", "--streams", "1,2",
               "--grpc-port", str(free_port()), "--http-port", str(free_port()), "--json", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(Path(out).read_text())
    paired = report["paired"]
    assert [p["sampling"] for p in paired].count("greedy") == 2 and len(paired) == 4
    assert all(p["identical"] for p in paired), paired  # fp32: served == in-process, greedy and sampled
    assert all(p["token_ratio"] > 0 for p in paired)
    assert "identical outputs" in done.stdout + done.stderr
