#!/bin/bash
# Per-prompt (7aa3bd2, in a worktree at ../ab-old: git worktree add ../ab-old 7aa3bd2) against
# per-chunk prefill fairness (this checkout), alternating, one process per run; under the machine's
# benchmark lock, nothing else running.
cd "$(git rev-parse --show-toplevel)"
out=benchmarks/tenants/prefill-chunks/runs.jsonl
: > $out
for run in 1 2 3; do
  for arm in per-prompt per-chunk; do
    if [ $arm = per-prompt ]; then pp=$PWD/../ab-old/services; else pp=$PWD/services; fi
    line=$(PYTHONPATH=$pp .venv/bin/python benchmarks/tenants/prefill-chunks/chunk_fairness.py qwen2.5-coder-1.5b-instruct --trials 2 --long 1536 --short 64 2>/dev/null | tail -1)
    echo "{\"arm\": \"$arm\", \"run\": $run, \"figures\": $line}" >> $out
    echo "$arm $run $line"
  done
done
