#!/usr/bin/env bash
# One prepared GPU session (a device machine gives a command 10 minutes, 15 minutes of GPU time in all,
# and returns at most 8 files of at most 16 MiB from $OUT): the CIFAR-10 recipe's GPU setting (g100:
# 100 epochs per run, bf16, the training set held on the GPU) under an internal deadline, its finished
# rows, curves, report and figure archived into one .tar.gz, then the GPU check with what time is left.
#
#   mkdir -p data && cp ../shared/data/cifar10.tar.gz data/    # here, once; carry data/cifar10.tar.gz
#   bash benchmarks/gpu_run.sh                                  # on the GPU machine; writes under $OUT
#   SMOKE=1 OUT=/tmp/x bash benchmarks/gpu_run.sh               # CPU smoke mode (what the tests run)
#
# BUDGET_S (default 420) is the whole script's deadline; the recipe gets RECIPE_S of it (default 300),
# the GPU check the rest. PYTHON picks the interpreter (default: python3, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
OUT="${OUT:?set OUT to the results folder}"
BUDGET_S="${BUDGET_S:-420}"
RECIPE_S="${RECIPE_S:-300}"
start=$SECONDS
mkdir -p "$OUT"
export CIFAR10_TAR="${CIFAR10_TAR:-data/cifar10.tar.gz}"
"$PY" recipes/cifar10_paired.py run --setting g100 --deadline_s "$RECIPE_S" --out "${RUNS:-/tmp/umae-runs/g100}" \
    --csv "${RUNS:-/tmp/umae-runs/g100}/cifar10_g100.csv" --archive "$OUT/cifar10_g100.tar.gz" \
    2>&1 | tail -n 400 > "$OUT/recipe.log"
left=$((BUDGET_S - (SECONDS - start)))
if (( left > 30 )); then
    smoke=()
    [[ "${SMOKE:-0}" == "1" ]] && smoke=(--smoke)
    timeout "$left" "$PY" benchmarks/gpu_check.py "${smoke[@]}" --out_dir "$OUT" > "$OUT/gpu_check.log" 2>&1 \
        || echo "gpu_check: stopped or failed (exit $?) after $left s budget" >> "$OUT/gpu_check.log"
else
    echo "gpu_check: skipped, $left s left" > "$OUT/gpu_check.log"
fi
echo "gpu_run: $((SECONDS - start)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
