#!/usr/bin/env bash
# The whole GPU verification in one call, on an offline machine that already has
# a CUDA build of torch:
#   scripts/gpu_check.sh OUTDIR
# Steps, in order of importance; each has its own time limit, cut further so that the whole call
# ends within BUDGET_S seconds (default 540, for a 600 s device call); a step that no longer fits
# is skipped and said so in summary.txt:
#   build            entmax_cuda for this machine's GPU only (--no-build-isolation --no-deps)
#   info             python -m entmax_cuda.info
#   attention-smoke  each CUDA attention path and dtype, and the decode op, against the CPU kernels, one line
#                    per case
#   tests-cuda       pytest -m cuda over the whole suite (JUnit XML beside the log; the transformers
#                    integration's tests need transformers importable: WHEELS can bring it)
#   example-sparse-lm  examples/sparse_lm.py on CUDA, 200 steps (both attentions; plots in the tarball)
#   bench-entmax     bench_entmax.py's 6 shapes x alpha 1.5, rand: fused, fused_xgrad, softmax,
#                    AdaSplash triton_entmax; copy bandwidth; before/after against the H200 run of
#                    07d9ecb (benchmarks/compare.py) and the operator's speed targets (benchmarks/targets.py)
#   bench-attention-*  bench_attention.py: fused vs SDPA flash, the composite, AdaSplash (bf16,
#                    L 1k-16k, D 64/128, random/local, causal/full), L = 32k/128k, learnable alpha,
#                    SIMT vs tensor cores, float16
#   bench-attention-sequences  bench_attention_sequences.py: packed sequences against padded batches,
#                    decode steps against SDPA (B 1/8, Hq 32, Hkv 8, D 128, Lcache 4k-128k)
# OUTDIR receives summary.txt, targets.txt, compare_fused.{md,png}, attention-smoke.txt and
# gpu-check.tar.gz (every log, JSON, table and plot) -- within the device tool's 8 files.
# Options (environment):
#   WHEELS=dir  pure-Python wheels to put on the path first (entmax, adasplash: benchmarks/README.md)
#   BENCH=0     skip the benchmarks;  SKIP_BUILD=1  use the entmax_cuda already installed
#   STEPS=a,b   run only these steps (names as above; bench-attention selects all its parts), e.g. a
#               second call on the still-warm machine: SKIP_BUILD=1 STEPS=bench-attention
#   BUDGET_S    the whole call's time limit in seconds (default 540)
#   TORCH_CUDA_ARCH_LIST  override the architecture (default: this GPU's)
set -uo pipefail
OUT=$(realpath -m "${1:?usage: scripts/gpu_check.sh OUTDIR}")
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
RESERVE_S=15   # packing the results
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

wanted() {  # wanted NAME: the step is selected by STEPS (all when STEPS is unset)
  [ -z "${STEPS:-}" ] && return 0
  local s
  for s in ${STEPS//,/ }; do
    case "$1" in "$s"|"$s"-*) return 0 ;; esac
  done
  return 1
}

step() {  # step NAME LIMIT_S CMD...: runs CMD within min(LIMIT_S, what the budget has left), logs to RUN/NAME.log
  local name=$1 limit=$2; shift 2
  if ! wanted "$name"; then return 0; fi
  local left=$(( BUDGET_S - RESERVE_S - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped (budget spent)" | tee -a "$OUT/summary.txt"
    return 124
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" >"$RUN/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - t0 ))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
  tail -n 3 "$RUN/$name.log"
  return $rc
}

{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  >"$RUN/machine.txt" 2>&1
git rev-parse --short HEAD >>"$RUN/machine.txt" 2>/dev/null || true
date -u >>"$RUN/machine.txt"
head -n 20 "$RUN/machine.txt" >>"$OUT/summary.txt"

built=0
if [ "${SKIP_BUILD:-0}" = 1 ] || ! wanted build; then
  built=1
elif step build 240 env ENTMAX_CUDA=1 $PY -m pip install -v --no-build-isolation --no-deps .; then
  built=1
fi
if [ "$built" = 1 ]; then
  # -P everywhere: the installed build, not the source tree
  step info 30 $PY -P -m entmax_cuda.info
  step attention-smoke 90 $PY -P scripts/gpu_smoke_attention.py --json "$RUN/attention-smoke.json"
  cp "$RUN/attention-smoke.log" "$OUT/attention-smoke.txt" 2>/dev/null
  step tests-cuda 240 $PY -P -m pytest -q -m cuda -p no:cacheprovider -rf --durations=15 tests \
    --junitxml="$RUN/tests-cuda.xml"
  grep -E "passed|failed" "$RUN/tests-cuda.log" | tail -n 1 >>"$OUT/summary.txt"
  step example-sparse-lm 60 $PY -P examples/sparse_lm.py --device cuda --steps 200 --out "$RUN/sparse_lm"
  if [ "${BENCH:-1}" != 0 ]; then
    step bench-entmax 120 $PY -P benchmarks/bench_entmax.py --device cuda --alphas 1.5,rand \
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
    bench_attention() {  # bench_attention PART LIMIT_S ARGS...
      local part=$1 limit=$2; shift 2
      step "bench-attention-$part" "$limit" $PY -P benchmarks/bench_attention.py --device cuda \
        --min-reps 3 --max-reps 30 --budget-s 0.15 --out "$RUN/attention-$part" "$@"
    }
    bench_attention matrix 120 --dtypes bfloat16 --dims 64,128 --lengths 1024,4096,16384 --inputs random,local \
      --causal no,yes --alphas 1.5 --methods fused,composite,sdpa,adasplash
    bench_attention long 60 --dtypes bfloat16 --dims 64 --heads 16 --lengths 32768,131072 --inputs random \
      --causal yes --alphas 1.5 --methods fused,composite,sdpa --min-reps 1 --max-reps 2 --budget-s 0.01
    bench_attention learnable-alpha 45 --dtypes bfloat16 --dims 64 --lengths 4096,16384 --inputs random,local \
      --causal no,yes --alphas 1.5,head --methods fused
    bench_attention paths 30 --dtypes bfloat16 --dims 64,128 --lengths 4096 --inputs random --causal no \
      --alphas 1.5 --methods fused,fused_simt
    bench_attention float16 25 --dtypes float16 --dims 64 --lengths 4096 --inputs random --causal no,yes \
      --alphas 1.5 --methods fused,sdpa,adasplash
    step bench-attention-sequences 60 $PY -P benchmarks/bench_attention_sequences.py --device cuda \
      --out "$RUN/attention-sequences"
  fi
fi
tar czf "$OUT/gpu-check.tar.gz" -C "$RUN" . && rm -rf "$RUN"
echo "total: $(( $(date +%s) - START ))s of a ${BUDGET_S}s budget" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"
