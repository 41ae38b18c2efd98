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
# figures), and the Serve replicas' logs when the bench fails. The bench runs under its own time limit
# (LIMIT_S) inside the call's, so the log and the replicas' logs still come back if it runs long.
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
    models=(--shapes qwen2.5-0.5b,qwen2.5-7b --config deploy/gpu-single.yaml --backend static --device cuda
            --streams 1,8,32)
else
    models=(--tiny --streams 1,8)
fi
step "bench serve ${models[*]}"
timeout --kill-after=20 "$LIMIT_S" "$PYTHON" -m speccascade.cli bench serve "${models[@]}" \
    --tokenizer "$SITE/tokenizer" --prompts 2 --sampling greedy,nucleus,unfiltered --json "$OUT/serve.json"
status=$?
step "bench serve exited with $status"
if [ "$status" -ne 0 ] && [ -d /tmp/ray/session_latest/logs ]; then
    (cd /tmp/ray/session_latest/logs && tar -czf "$OUT/ray-logs.tgz" --exclude='*.out' serve raylet.err 2>/dev/null)
    # A bench killed by the limit leaves its Ray cluster running: on the lent machine (ours alone)
    # stop every Ray process; here, stop only this run's, by the ids Ray wrote for it.
    if [ "$mode" = gpu ]; then
        "$PYTHON" -m ray.scripts.scripts stop --force >/dev/null 2>&1
    else
        session=$(readlink -f /tmp/ray/session_latest)
        pgrep -f -- "$session" | xargs -r kill 2>/dev/null
    fi
fi
exit "$status"
