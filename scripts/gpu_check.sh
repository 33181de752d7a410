#!/usr/bin/env bash
# Everything agoq-ds checks on a CUDA machine, in one command (about 10 minutes on one H200):
# install (DeepSpeed/pydantic from wheels when missing), build the CUDA kernels, run the GPU tests
# (pytest -m gpu), the kernel bandwidth table (benchmarks/gpu_kernels.py) and the step benchmark
# (benchmarks/gpu_step.py), then print one summary.
#   scripts/gpu_check.sh [OUT_DIR]         (default: $OUT, else results/gpu_check)
# Environment: AGOQ_WHEELS (wheel folder, default .whl/: a copy of shared/gpu-wheels), TORCH_CUDA_ARCH_LIST
# (default 9.0), GPU_STEP_ARGS (extra arguments for gpu_step.py), GPU_KERNEL_ARGS (for gpu_kernels.py),
# GPU_CHECK_DEVICE (cuda; cpu runs the same stages on the tiny shape to test this script without a GPU:
# the install is left as it is, the CUDA kernel table is skipped).
# Each stage writes its log under OUT_DIR; a failed stage is reported and the next one still runs.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out="${1:-${OUT:-$root/results/gpu_check}}"
mkdir -p "$out"
py=python3
status=()
stage() {  # stage NAME COMMAND...: run, log to $out/NAME.log, record the outcome
  local name=$1
  shift
  local start=$SECONDS
  echo "[gpu_check] $name ..."
  if "$@" >"$out/$name.log" 2>&1; then
    status+=("$name: ok ($((SECONDS - start)) s)")
  else
    status+=("$name: FAILED ($((SECONDS - start)) s, see $out/$name.log)")
  fi
  tail -n 3 "$out/$name.log"
}

if ! $py -c "import deepspeed, pydantic" 2>/dev/null; then
  wheels="${AGOQ_WHEELS:-$root/.whl}"
  stage wheels $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/agoq-site "$wheels"/*.whl
  export PYTHONPATH="/tmp/agoq-site${PYTHONPATH:+:$PYTHONPATH}"
fi
device="${GPU_CHECK_DEVICE:-cuda}"
export DS_ACCELERATOR=$device TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHONWARNINGS=ignore
export AGOQ_CACHE_DIR="$out/agoq_cache"  # the measured kernel table (kernel_backend auto) comes back with OUT
step_args=()
if [ "$device" = cuda ]; then
  stage build $py -m pip install --no-build-isolation --no-deps --no-index -e .
else  # rebuilding would overwrite the kernels a running process has loaded
  status+=("build: skipped (GPU_CHECK_DEVICE=$device)")
  step_args=(--device "$device" --shapes tiny --steps 2 --warmup 1)
fi
stage report $py -m agoq_ds report
if $py -c "import pytest" 2>/dev/null; then
  stage pytest_gpu $py -m pytest -q -m gpu tests/quant -p no:cacheprovider
else
  status+=("pytest_gpu: skipped (pytest is not installed here)")
fi
if [ "$device" = cuda ]; then
  # shellcheck disable=SC2086
  stage gpu_kernels $py benchmarks/gpu_kernels.py --numel 67108864 --out "$out/gpu_kernels.json" ${GPU_KERNEL_ARGS:-}
else
  status+=("gpu_kernels: skipped (GPU_CHECK_DEVICE=$device)")
fi
# shellcheck disable=SC2086
stage gpu_step_76m $py benchmarks/gpu_step.py --shapes 76m --steps 12 --warmup 4 --out "$out/gpu_step_76m.json" \
  "${step_args[@]}" ${GPU_STEP_ARGS:-}
# shellcheck disable=SC2086
stage gpu_step_76m_zero3 $py benchmarks/gpu_step.py --shapes 76m --variants stock agoq agoq-grad --zero-stage 3 \
  --steps 10 --warmup 4 --out "$out/gpu_step_76m_zero3.json" "${step_args[@]}" ${GPU_STEP_ARGS:-}
# shellcheck disable=SC2086
stage gpu_step_076b $py benchmarks/gpu_step.py --shapes 0.76b --variants stock agoq agoq-act agoq-grad --steps 10 \
  --warmup 4 --out "$out/gpu_step_076b.json" "${step_args[@]}" ${GPU_STEP_ARGS:-}

{
  echo "=== gpu_check summary ($(date -u +%FT%TZ), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)) ==="
  printf '%s\n' "${status[@]}"
  echo "--- pytest -m gpu"
  tail -n 2 "$out/pytest_gpu.log" 2>/dev/null
  echo "--- kernels (bandwidth / device copy; target >= 0.85)"
  grep -E "^(cuda|triton) " "$out/gpu_kernels.log" 2>/dev/null | awk '{print $1, $2, $3"b", "g"$4, $5, $6, $9}' | column -t
  echo "--- kernel_backend auto: fastest backend per op/width (measured, $out/agoq_cache)"
  tables=("$out"/agoq_cache/kernels-cuda-*.json)
  if [ -f "${tables[0]}" ]; then
    $py -c "import json, sys; print(json.load(open(sys.argv[1]))['choices'])" "${tables[0]}"
  else
    echo "(no table: no CUDA device, or a single compiled backend)"
  fi
  echo "--- step benchmark"
  grep -A20 "^shape" "$out/gpu_step_76m.log" 2>/dev/null
  grep -A20 "^shape" "$out/gpu_step_76m_zero3.log" 2>/dev/null
  grep -A20 "^shape" "$out/gpu_step_076b.log" 2>/dev/null
} | tee "$out/summary.txt"
