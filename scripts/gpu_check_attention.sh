#!/usr/bin/env bash
# GPU check of the fused attention (issue 10) on a machine where entmax_cuda is already built and
# installed (scripts/gpu_check.sh builds it):
#   scripts/gpu_check_attention.sh OUTDIR
# 1. smoke: each CUDA path and dtype against the CPU kernel, one line per case (seconds);
# 2. the CUDA attention tests (pytest -m cuda), time-limited;
# 3. benchmarks/bench_attention.py --device cuda over the issue's matrix trimmed to ~4 minutes on an
#    H200 (bf16 L 1k-16k D 64/128 random/local causal/full against composite, SDPA flash, AdaSplash;
#    learnable per-head alpha; float16; SIMT against tensor cores; L = 32k and 128k, 16 heads, D 64).
# Logs: OUTDIR/attention-<step>.log, results OUTDIR/attention-bench-<part>/, a line per step in
# OUTDIR/summary.txt. Budget: under 10 minutes. BENCH=0 skips step 3; PYTHON picks the interpreter.
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_check_attention.sh OUTDIR}")
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
  return $rc
}

step attention-smoke 300 $PY scripts/gpu_smoke_attention.py --json "$OUT/attention-smoke.json"
cat "$OUT/attention-smoke.log"
step attention-tests-cuda 300 $PY -P -m pytest -q -m cuda -p no:cacheprovider --durations=15 \
  tests/test_attention.py tests/test_attention_ops.py --junitxml="$OUT/attention-tests-cuda.xml"

if [ "${BENCH:-1}" != 0 ]; then
  bench() {  # bench PART TIMEOUT_S ARGS...
    local part=$1 limit=$2; shift 2
    step "attention-bench-$part" "$limit" $PY benchmarks/bench_attention.py --device cuda \
      --min-reps 3 --max-reps 30 --budget-s 0.15 --out "$OUT/attention-bench-$part" "$@"
  }
  bench matrix 120 --dtypes bfloat16 --dims 64,128 --lengths 1024,4096,16384 --inputs random,local \
    --causal no,yes --alphas 1.5 --methods fused,composite,sdpa,adasplash
  bench long 60 --dtypes bfloat16 --dims 64 --heads 16 --lengths 32768,131072 --inputs random --causal yes \
    --alphas 1.5 --methods fused,composite,sdpa --min-reps 1 --max-reps 2 --budget-s 0.01
  bench learnable-alpha 45 --dtypes bfloat16 --dims 64 --lengths 4096,16384 --inputs random,local \
    --causal no,yes --alphas 1.5,head --methods fused
  bench paths 30 --dtypes bfloat16 --dims 64,128 --lengths 4096 --inputs random --causal no --alphas 1.5 \
    --methods fused,fused_simt
  bench float16 25 --dtypes float16 --dims 64 --lengths 4096 --inputs random --causal no,yes --alphas 1.5 \
    --methods fused,sdpa,adasplash
fi
cat "$OUT/summary.txt"
