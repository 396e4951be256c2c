#!/usr/bin/env bash
# The whole GPU verification of the kernels (issue 11), in one call, on an offline machine
# that already has a CUDA build of torch (about 6-8 minutes on an H200):
#   scripts/gpu_check.sh OUTDIR
#   1. build entmax_cuda for this machine's GPU only (no network: --no-build-isolation --no-deps)
#   2. python -m entmax_cuda.info
#   3. the CUDA tests (pytest -m cuda), JUnit XML beside the log
#   4. the benchmark matrix (bench_entmax.py's 6 shapes x alpha 1.5, rand): fused, fused with
#      the x-gradient alone, softmax, AdaSplash triton_entmax (when importable); copy bandwidth
#   5. before/after tables and roofline plots against the H200 run of 07d9ecb
#      (benchmarks/compare.py), and the targets of issue 11 checked (benchmarks/targets.py)
# OUTDIR receives summary.txt, compare_fused.{md,png}, targets.txt and gpu-check.tar.gz
# (every log, JSON and table). Options (environment):
#   WHEELS=dir  pure-Python wheels to put on the path first (entmax, adasplash: see benchmarks/README.md)
#   BENCH=0     skip the benchmark (e.g. while other GPU work would distort its timings)
#   TORCH_CUDA_ARCH_LIST  override the architecture (default: this GPU's)
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_check.sh OUTDIR}")
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
RUN="$OUT/run"  # everything detailed; packed into gpu-check.tar.gz at the end
mkdir -p "$RUN"
: >"$OUT/summary.txt"

if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/entmax-extra "$WHEELS"/*.whl \
    && export PYTHONPATH="/tmp/entmax-extra${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-13.0; do [ -x "$d/bin/nvcc" ] && export CUDA_HOME="$d" && break; done
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to RUN/NAME.log
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" >"$RUN/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$RUN/$name.log"
  return $rc
}

{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  >"$RUN/machine.txt" 2>&1
git rev-parse --short HEAD >>"$RUN/machine.txt" 2>/dev/null || true
date -u >>"$RUN/machine.txt"
head -n 20 "$RUN/machine.txt" >>"$OUT/summary.txt"

if step build 300 env ENTMAX_CUDA=1 $PY -m pip install -v --no-build-isolation --no-deps .; then
  step info 60 $PY -P -m entmax_cuda.info
  # -P: the installed build, not the source tree
  step tests-cuda 240 $PY -P -m pytest -q -m cuda -p no:cacheprovider -rf tests --junitxml="$RUN/tests-cuda.xml"
  grep -E "passed|failed" "$RUN/tests-cuda.log" | tail -n 1 >>"$OUT/summary.txt"
  if [ "${BENCH:-1}" != 0 ]; then
    step bench-entmax 300 $PY -P benchmarks/bench_entmax.py --device cuda --alphas 1.5,rand \
      --methods fused,fused_xgrad,softmax,triton_entmax --min-reps 5 --budget-s 0.1 --out "$RUN"
    BEFORE=benchmarks/results/h200-2026-11-27-entmax-07d9ecb.json
    AFTER="$RUN/bench_entmax_cuda.json"
    if [ -f "$AFTER" ]; then
      for method in fused fused_xgrad; do
        $PY benchmarks/compare.py "before-07d9ecb=$BEFORE" "after=$AFTER" --method $method --out "$RUN" \
          >"$RUN/compare-$method.log" 2>&1
      done
      cp "$RUN/compare_fused.md" "$RUN/compare_fused.png" "$OUT/" 2>/dev/null
      $PY benchmarks/targets.py "$AFTER" | tee "$OUT/targets.txt" | tail -n 5
    fi
  fi
fi
tar czf "$OUT/gpu-check.tar.gz" -C "$RUN" . && rm -rf "$RUN"
cat "$OUT/summary.txt"
