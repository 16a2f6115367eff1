#!/usr/bin/env bash
# The first run on a GPU, in one go (docs/scale.md, "First run on a GPU"): every step is bounded by
# its own timeout (165 + 90 + 150 + 75 s), so the whole run stays under 8 minutes.
#
#   benchmarks/gpu_check.sh OUT [--dry-run]
#
# Writes OUT/gpu_check.jsonl (one JSON line per measurement and per step), OUT/gpu_tests.txt (the
# GPU tests' output) and OUT/summary.md. Steps: the GPU tests (pytest -m "gpu and not slow"),
# projection throughput, `cropi score` on a 1.5B-shaped model, one trainer step of it
# (benchmarks/gpu_check.py). A failed or timed-out step is recorded and the next one runs.
# --dry-run: every step at tiny sizes on the CPU (seconds; the test suite runs it).
# PYTHON: the interpreter with cropi's dependencies (default: python).
set -uo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: benchmarks/gpu_check.sh OUT [--dry-run]" >&2
    exit 2
fi
OUT=$1
shift
DRY=()
for a in "$@"; do
    case "$a" in
        --dry-run) DRY=(--dry-run) ;;
        *) echo "gpu_check.sh: unknown option $a" >&2; exit 2 ;;
    esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/gpu_check.jsonl" "$OUT/summary.md"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false CROPI_QUIET=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

step() {  # step NAME TIMEOUT_S COMMAND...: run it, record its exit code and seconds
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name" >&2
    timeout "$limit" "$@"
    local rc=$?
    printf '{"bench": "gpu_check.step", "step": "%s", "rc": %d, "seconds": %d, "timeout_s": %d}\n' \
        "$name" "$rc" $((SECONDS - t0)) "$limit" >> "$OUT/gpu_check.jsonl"
}

if [[ ${#DRY[@]} -gt 0 ]]; then  # on the CPU the GPU tests skip: check that they are collected and skip cleanly
    step tests 120 bash -c "'$PY' -m pytest -q -p no:cacheprovider -m gpu tests/test_device_paths.py > '$OUT/gpu_tests.txt' 2>&1"
else
    step tests 165 bash -c "'$PY' -m pytest -q -p no:cacheprovider -m 'gpu and not slow' tests > '$OUT/gpu_tests.txt' 2>&1"
fi
step projection 90 "$PY" benchmarks/gpu_check.py projection --out "$OUT" "${DRY[@]}"
step score 150 "$PY" benchmarks/gpu_check.py score --out "$OUT" "${DRY[@]}"
step train 75 "$PY" benchmarks/gpu_check.py train --out "$OUT" "${DRY[@]}"
"$PY" benchmarks/gpu_check.py summary --out "$OUT" "${DRY[@]}"
