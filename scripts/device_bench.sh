#!/usr/bin/env bash
# The served round on a lent GPU machine, in one call (docs/gpu.md): the served cascade against the
# in-process one on 0.5B- and 7B-shaped models with random weights (static backend, bf16, CUDA
# graphs), at 1, 8 and 32 concurrent streams, with how every forward pass ran (graph replays, eager
# fallbacks) and the sessions that lost their slot. The machine has Python, torch and transformers
# but no Ray, pydantic or FastAPI: they come from the carry that scripts/pack_device_carry.py packs.
#
#   here:        python scripts/pack_device_carry.py              # .device/serving.tar.xz, CPython 3.12
#   the device:  the run tool with carry [".device"] and timeout_s 590:  bash scripts/device_bench.sh
#   here, to try this script on the CPU first (a tiny pair, a Python without Ray; docs/gpu.md):
#                python scripts/pack_device_carry.py --python 3.11
#                PYTHON=/some/python-without-ray bash scripts/device_bench.sh --tiny
#
# Everything lands in $OUT (what the run tool brings back): `log` (this output), `serve.json` (the
# figures), `pipeline.json` (pipelining off against on, when time is left for it), and the Serve
# replicas' logs when a bench fails. Both benches run within one time limit of their own (LIMIT_S)
# inside the call's, so the log and the replicas' logs still come back if they run long.
set -uo pipefail

mode=gpu
case "${1:-}" in
    "") ;;
    --tiny) mode=tiny ;;
    *) echo "usage: $0 [--tiny]" >&2; exit 2 ;;
esac
OUT=${OUT:-$PWD/.device/out}
PYTHON=${PYTHON:-python3}
CARRY=${CARRY:-.device/serving.tar.xz}
SITE=${SITE:-/tmp/speccascade-carry}
LIMIT_S=${LIMIT_S:-540}
PIPELINE_MIN_S=${PIPELINE_MIN_S:-150}  # the pipelining comparison runs only with this much of LIMIT_S left

mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
step() { echo "== $(date -u +%T) $*"; }

step "environment ($mode)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" - <<'EOF'
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda {torch.cuda.is_available() and torch.cuda.get_device_name(0)}, cpus {__import__('os').cpu_count()}")
EOF

step "unpacking $CARRY into $SITE"
if [ ! -f "$CARRY" ]; then
    echo "no $CARRY: pack it first (python scripts/pack_device_carry.py) and carry .device" >&2
    exit 1
fi
rm -rf "$SITE" && mkdir -p "$SITE" && tar -xJf "$CARRY" -C "$SITE" || exit 1
export PYTHONPATH="$PWD/services:$SITE/site" PYTHONUNBUFFERED=1
"$PYTHON" -c "import ray, ray.serve, pydantic, fastapi, grpc, speccascade.app; print('ray', ray.__version__)" || exit 1

if [ "$mode" = gpu ]; then
    # The random 0.5B and 7B are made once (~16 GB on disk) and used again by the pipelining comparison.
    pair=(--shapes qwen2.5-0.5b,qwen2.5-7b --shapes-dir "${SHAPES_DIR:-/tmp/speccascade-shapes}"
          --config deploy/gpu-single.yaml --backend static --device cuda)
    streams=1,8,32
else
    pair=(--tiny)
    streams=1,8
fi
pair+=(--tokenizer "$SITE/tokenizer")

# A bench killed by its limit leaves its Ray cluster running: on the lent machine (ours alone) stop
# every Ray process; here, stop only this run's, by the ids Ray wrote for it. Its replicas' logs first.
after_failure() {
    [ -d /tmp/ray/session_latest/logs ] || return 0
    (cd /tmp/ray/session_latest/logs && tar -czf "$OUT/ray-logs-$1.tgz" --exclude='*.out' serve raylet.err 2>/dev/null)
    if [ "$mode" = gpu ]; then
        "$PYTHON" -m ray.scripts.scripts stop --force >/dev/null 2>&1
    else
        session=$(readlink -f /tmp/ray/session_latest)
        pgrep -f -- "$session" | xargs -r kill 2>/dev/null
    fi
}

# `timeout --foreground` signals the bench alone: without it, timeout signals its whole process group,
# where the bench's Ray cluster (GCS, raylet, agents) runs too, so the cluster went down at once and
# the bench, stopping it and writing what it measured, could hang on it until the kill.
started=$SECONDS
step "bench serve ${pair[*]} --streams $streams"
timeout --foreground --kill-after=20 "$LIMIT_S" "$PYTHON" -m speccascade.cli bench serve "${pair[@]}" --streams "$streams" \
    --prompts 2 --sampling greedy,nucleus,unfiltered --json "$OUT/serve.json"
status=$?
step "bench serve exited with $status"
[ "$status" -ne 0 ] && after_failure serve

# In the time left: whether a block drafted ahead overlaps the verify on one GPU the tiers share
# (time-sliced without MPS; docs/gpu.md). Random weights seldom agree, so pre-drafts miss; what
# tells is the expert's forward time a round with pipelining on against off, in the breakdown.
left=$((LIMIT_S - (SECONDS - started)))
if [ "$status" -ne 0 ]; then
    step "no pipelining comparison: the bench failed"
elif [ "$left" -lt "$PIPELINE_MIN_S" ]; then
    step "no pipelining comparison: $left s left, it needs $PIPELINE_MIN_S"
else
    step "bench serve ${pair[*]} --pipeline off,on ($left s left)"
    timeout --foreground --kill-after=20 "$left" "$PYTHON" -m speccascade.cli bench serve "${pair[@]}" --streams 1,8 \
        --skip-in-process --prompts 2 --sampling greedy --pipeline off,on --json "$OUT/pipeline.json"
    pipeline_status=$?
    step "bench serve (pipelining) exited with $pipeline_status"
    [ "$pipeline_status" -ne 0 ] && after_failure pipeline
fi
exit "$status"
