#!/usr/bin/env bash
# The GPU check, ready to run from the checkout (torch, torchvision, timm, numpy; nothing to install):
# MAE vs U-MAE ViT-B/16 throughput and MFU (eager and per-block compiled), the SDPA kernel in use, the
# data path of each --data_backend, and 200 steps of main_pretrain.py per backend. Under ~5 minutes of
# one H100 / H200; JSON to benchmarks/results/gpu_check_<gpu>.json. See benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine
#   SMOKE=1 bash benchmarks/gpu_check.sh --out_dir /tmp/x    # CPU smoke mode (what the tests run)
#   bash benchmarks/gpu_check.sh --skip compile,main_pretrain   # parts left out
#
# PYTHON picks the interpreter (default: python3, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
args=()
if [[ "${SMOKE:-0}" == "1" ]]; then
    args+=(--smoke)
fi
exec "$PY" benchmarks/gpu_check.py "${args[@]}" "$@"
