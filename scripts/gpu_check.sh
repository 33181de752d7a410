#!/usr/bin/env bash
# Everything agoq-ds checks on a CUDA machine, in one command that fits one short GPU run (issue 23):
# stages run in value order, each only if the time left in the budget covers its expected duration,
# each under `timeout` of min(time left, its cap); what would not finish is skipped and listed.
#   scripts/gpu_check.sh [--stages a,b,c] [--budget SECONDS] [OUT_DIR]
#       OUT_DIR default: $OUT, else results/gpu_check.  Also GPU_CHECK_STAGES, GPU_CHECK_BUDGET (480).
# Stages (default: all, in this order): wheels build report pytest_gpu kernels step_76m step_076b
#   compile_76m parity_76m step_76m_zero3 step_76m_ckpt offload_76m.
# OUT_DIR ends up holding two files only: gpu_check.tar.gz (every log, JSON, plot and the measured
# kernel table) and summary.txt (also printed), so that a run whose results come back as at most 8
# files brings everything back.
# Environment: AGOQ_WHEELS (wheel folder, default .whl/: a copy of shared/gpu-wheels), TORCH_CUDA_ARCH_LIST
# (default 9.0), GPU_STEP_ARGS (extra arguments for gpu_step.py), GPU_KERNEL_ARGS (for gpu_kernels.py),
# GPU_CHECK_DEVICE (cuda; cpu runs the same stages on tiny shapes to test this script without a GPU:
# the install is left as it is, the CUDA kernel table is skipped, the CPU column of the table applies).
# A failed or timed-out stage is reported and the next one still runs.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# name  expected GPU s  expected CPU s  cap s.  GPU seconds are ESTIMATES, not measurements (the one
# H200 run of issue 12 recorded no stage times): ~20 s start-up per gpu_step.py variant (torch +
# DeepSpeed import, engine build), wheels ~10 s, the kernel build ~2 min (issue 23), kernels 36
# configurations x 200 calls at 2^28 elements plus Triton compiles, 0.76B at ~2x stock's step,
# parity 2 runs x 400 steps of the 76M shape (~1 min per run on an H200, scripts/gpu_convergence.sh).
# CPU seconds: measured with GPU_CHECK_DEVICE=cpu on the 2-core development machine (docs/results.md).
STAGE_TABLE="
wheels          15    1    60
build          150    1   300
report          15   25    60
pytest_gpu      60   15   180
kernels         60    1   180
step_76m       100   60   240
step_076b      170   70   300
compile_76m    170  100   300
parity_76m     150   70   300
step_76m_zero3  75   55   200
step_76m_ckpt   50   30   150
offload_76m    120   30   240
"
all_stages=$(awk 'NF {printf "%s%s", sep, $1; sep=","}' <<<"$STAGE_TABLE")

stages="${GPU_CHECK_STAGES:-$all_stages}"
budget="${GPU_CHECK_BUDGET:-480}"
out="${OUT:-$root/results/gpu_check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --stages) stages=$2; shift 2 ;;
    --stages=*) stages=${1#*=}; shift ;;
    --budget) budget=$2; shift 2 ;;
    --budget=*) budget=${1#*=}; shift ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
for s in ${stages//,/ }; do
  if ! grep -qE "^$s[[:space:]]" <<<"$STAGE_TABLE"; then
    echo "gpu_check: unknown stage $s (stages: $all_stages)" >&2
    exit 2
  fi
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$out/gpu_check"  # everything goes here, then into gpu_check.tar.gz
rm -rf "$work" "$out/gpu_check.tar.gz" "$out/summary.txt"
mkdir -p "$work"
py=python3
device="${GPU_CHECK_DEVICE:-cuda}"
t0=$SECONDS
status=()

wanted() { [[ ",$stages," == *",$1,"* ]]; }
field() {  # field STAGE COLUMN: a number from STAGE_TABLE
  awk -v s="$1" -v c="$2" '$1 == s {print $c}' <<<"$STAGE_TABLE"
}
stage() {  # stage NAME COMMAND...: run under the budget, log to $work/NAME.log, record the outcome
  local name=$1 expected cap left limit start rc
  shift
  wanted "$name" || return 0
  if [ "$device" = cuda ]; then expected=$(field "$name" 2); else expected=$(field "$name" 3); fi
  cap=$(field "$name" 4)
  left=$((budget - (SECONDS - t0)))
  if [ "$left" -lt "$expected" ]; then
    status+=("$name: skipped (expects ${expected} s, ${left} s of the budget left)")
    echo "[gpu_check] $name skipped (expects ${expected} s, ${left} s left)"
    return 0
  fi
  limit=$((left < cap ? left : cap))
  echo "[gpu_check] $name (expects ${expected} s, limit ${limit} s) ..."
  start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    status+=("$name: ok ($((SECONDS - start)) s, expected ${expected} s)")
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status+=("$name: TIMED OUT ($((SECONDS - start)) s, limit ${limit} s, see $name.log)")
  else
    status+=("$name: FAILED (exit $rc, $((SECONDS - start)) s, see $name.log)")
  fi
  tail -n 3 "$work/$name.log"
}
not_here() {  # not_here NAME REASON: a wanted stage that does not apply on this machine
  wanted "$1" && status+=("$1: skipped ($2)")
  return 0
}

if [ "$device" = cuda ] && ! $py -c "import deepspeed, pydantic" 2>/dev/null; then
  wheels="${AGOQ_WHEELS:-$root/.whl}"
  stage wheels $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/agoq-site "$wheels"/*.whl
  export PYTHONPATH="/tmp/agoq-site${PYTHONPATH:+:$PYTHONPATH}"
else
  not_here wheels "DeepSpeed and pydantic already importable, or GPU_CHECK_DEVICE=$device"
fi
export DS_ACCELERATOR=$device TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHONWARNINGS=ignore
export AGOQ_CACHE_DIR="$work/agoq_cache"  # the measured kernel table (kernel_backend auto) comes back too
step_args=()
offload_args=(--model 76m --seq-len 1024 --micro 4 --world-size 1 --configs 3:1 3:8 --steps 4 --warmup 2)
conv_args=(--device cuda --model 76m --seq-len 1024 --micro-batch 16 --eval-batches 8 --steps 400 --eval-every 100)
if [ "$device" = cuda ]; then
  stage build $py -m pip install --no-build-isolation --no-deps --no-index -e .
else  # rebuilding would overwrite the kernels a running process has loaded
  not_here build "GPU_CHECK_DEVICE=$device"
  step_args=(--device "$device" --shapes tiny --steps 2 --warmup 1)
  offload_args=(--model tiny --seq-len 32 --dtype fp32 --world-size 1 --configs 3:8 --steps 1 --warmup 1)
  conv_args=(--device cpu --model tiny --seq-len 32 --micro-batch 2 --eval-batches 2 --steps 20 --eval-every 10 --threads 1)
fi
stage report $py -m agoq_ds report
if $py -c "import pytest" 2>/dev/null; then
  stage pytest_gpu $py -m pytest -q -m gpu tests/quant -p no:cacheprovider
else
  not_here pytest_gpu "pytest is not installed here"
fi
if [ "$device" = cuda ]; then
  # Many back-to-back calls between two CUDA events per measurement (benchmarks/gpu_kernels.py).
  # shellcheck disable=SC2086
  stage kernels $py benchmarks/gpu_kernels.py --numel 268435456 --out "$work/gpu_kernels.json" ${GPU_KERNEL_ARGS:-}
else
  not_here kernels "GPU_CHECK_DEVICE=$device"
fi
# shellcheck disable=SC2086
stage step_76m $py benchmarks/gpu_step.py --shapes 76m --variants stock agoq agoq-act agoq-grad --steps 12 --warmup 4 \
  --out "$work/step_76m.json" "${step_args[@]}" ${GPU_STEP_ARGS:-}
# shellcheck disable=SC2086
stage step_076b $py benchmarks/gpu_step.py --shapes 0.76b --variants stock agoq agoq-act agoq-grad --steps 10 \
  --warmup 4 --out "$work/step_076b.json" "${step_args[@]}" ${GPU_STEP_ARGS:-}
# Stock and agoq under engine.compile() (issue 26: compiled agoq <= 1.05x compiled stock).
# shellcheck disable=SC2086
stage compile_76m $py benchmarks/gpu_step.py --shapes 76m --variants stock agoq --compile --steps 10 --warmup 5 \
  --out "$work/compile_76m.json" "${step_args[@]}" ${GPU_STEP_ARGS:-}
# Loss parity, stock vs "agoq": {}: 1 seed, 400 steps, held-out loss every 100 steps (issue 13's 76M
# configuration of scripts/gpu_convergence.sh, one seed).
stage parity_76m $py benchmarks/convergence.py "${conv_args[@]}" --world-size 1 --grad-accum 1 \
  --lr 1e-3 --warmup 0.1 --seeds 1 --variants agoq --out "$work/parity_76m"
# shellcheck disable=SC2086
stage step_76m_zero3 $py benchmarks/gpu_step.py --shapes 76m --variants stock agoq agoq-grad --zero-stage 3 \
  --steps 10 --warmup 4 --out "$work/step_76m_zero3.json" "${step_args[@]}" ${GPU_STEP_ARGS:-}
# shellcheck disable=SC2086
stage step_76m_ckpt $py benchmarks/gpu_step.py --shapes 76m --variants stock-ckpt agoq-ckpt --steps 10 --warmup 4 \
  --out "$work/step_76m_ckpt.json" "${step_args[@]}" ${GPU_STEP_ARGS:-}
# ZeRO-3 with optimizer and parameter offload, stock vs agoq (issue 24): step time and the gradient
# bytes that cross PCIe per step (one GPU: the reduction is local, the offload traffic is real).
stage offload_76m $py benchmarks/offload.py "${offload_args[@]}" --out "$work/offload_76m.json"

{
  echo "=== gpu_check summary ($(date -u +%FT%TZ), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
  echo "device $device, stages $stages, budget $budget s, used $((SECONDS - t0)) s; logs in gpu_check.tar.gz"
  printf '%s\n' "${status[@]}"
  if [ -f "$work/pytest_gpu.log" ]; then
    echo "--- pytest -m gpu"
    tail -n 2 "$work/pytest_gpu.log"
  fi
  if [ -f "$work/kernels.log" ]; then
    echo "--- kernels (bandwidth / device copy; target >= 0.85)"
    grep -E "^(cuda|triton) " "$work/kernels.log" | awk '{print $1, $2, $3"b", "g"$4, $5, $6, $9}' | column -t
  fi
  tables=("$work"/agoq_cache/kernels-cuda-*.json)
  if [ -f "${tables[0]}" ]; then
    echo "--- kernel_backend auto: fastest backend per op/width (measured)"
    $py -c "import json, sys; print(json.load(open(sys.argv[1]))['choices'])" "${tables[0]}"
  fi
  for s in step_76m step_076b compile_76m step_76m_zero3 step_76m_ckpt; do
    if [ -f "$work/$s.log" ]; then
      echo "--- $s (replay: replayed/forwards of the activation quantizer; fused: Triton norm+gate calls)"
      grep -A20 "^shape" "$work/$s.log"
    fi
  done
  if [ -f "$work/offload_76m.log" ]; then
    echo "--- offload_76m (ZeRO-3 offload: step time and gradient bytes to the host, stock -> agoq)"
    grep "^ZeRO-" "$work/offload_76m.log"
  fi
  if [ -f "$work/parity_76m.log" ]; then
    echo "--- parity_76m (held-out loss, stock vs agoq)"
    sed -n '/final figures/,$p' "$work/parity_76m.log" | grep -v '^wrote'
  fi
} >"$work/summary.txt" 2>&1
cp "$work/summary.txt" "$out/summary.txt"
tar -czf "$out/gpu_check.tar.gz" -C "$out" gpu_check && rm -rf "$work"
cat "$out/summary.txt"
