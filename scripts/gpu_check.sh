#!/usr/bin/env bash
# GPU verification on an offline machine that already has a CUDA build of torch:
#   scripts/gpu_check.sh OUTDIR
# builds entmax_cuda (no network: --no-build-isolation --no-deps), runs the CUDA
# tests, then a short benchmark; every step's log lands in OUTDIR. Budget: < 8 min.
# Optional: WHEELS=dir of extra pure-Python wheels (e.g. the entmax library) to put on PYTHONPATH;
# BENCH=0 skips the benchmark (e.g. while other GPU work runs, which would distort its timings).
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_check.sh OUTDIR}")
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/entmax-extra "$WHEELS"/*.whl \
    && export PYTHONPATH="/tmp/entmax-extra${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-13.0; do [ -x "$d/bin/nvcc" ] && export CUDA_HOME="$d" && break; done
fi
# Build only for the GPU in this machine (fast); override with TORCH_CUDA_ARCH_LIST.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
  return $rc
}

{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  >"$OUT/machine.txt" 2>&1
git rev-parse --short HEAD >>"$OUT/machine.txt" 2>/dev/null || true
date -u >>"$OUT/machine.txt"

step build 300 env ENTMAX_CUDA=1 $PY -m pip install -v --no-build-isolation --no-deps . || exit 1
step info 60 $PY -P -m entmax_cuda.info
step tests-cuda 180 $PY -P -m pytest -q -m cuda -p no:cacheprovider tests \
  --junitxml="$OUT/tests-cuda.xml"
if [ "${BENCH:-1}" != 0 ]; then
  step bench-entmax 180 $PY benchmarks/bench_entmax.py --device cuda --quick --out "$OUT"
fi
cat "$OUT/summary.txt"
