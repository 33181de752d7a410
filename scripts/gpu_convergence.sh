#!/usr/bin/env bash
# Issue 13's GPU configuration of the convergence benchmark, on one CUDA GPU: the 76M LLaMA
# (hidden 768, 12 layers, 12 heads, 4 KV heads, MLP 2048), sequence 1024, micro-batch 16, ZeRO-2 bf16,
# AdamW lr 1e-3 (10% warm-up, cosine to 0.1), 400 steps, held-out loss on 8 fixed batches every 50 steps; stock and agoq paired over
# 3 seeds (mean paired gap and its 95% interval), plus whatever else is named in VARIANTS.
# About 1 minute per run on an H200 plus start-up; run scripts/gpu_check.sh first in the same session
# (it installs DeepSpeed/pydantic from wheels and builds the kernels), or let this script do the install.
#   scripts/gpu_convergence.sh [OUT_DIR]     (default: $OUT/convergence_76m, else results/convergence_76m)
# Environment: VARIANTS (convergence.py --variants, default "agoq"), SEEDS (default 3), STEPS (400).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out="${1:-${OUT:+$OUT/convergence_76m}}"
out="${out:-$root/results/convergence_76m}"
py=python3
if ! $py -c "import deepspeed, pydantic" 2>/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/agoq-site "${AGOQ_WHEELS:-$root/.whl}"/*.whl
  export PYTHONPATH="/tmp/agoq-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! $py -c "import agoq_ds" 2>/dev/null; then
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" $py -m pip install -q --no-build-isolation --no-deps --no-index -e .
fi
# shellcheck disable=SC2086
$py benchmarks/convergence.py --device cuda --world-size 1 --model 76m --steps "${STEPS:-400}" --seq-len 1024 \
  --micro-batch 16 --grad-accum 1 --lr 1e-3 --warmup 0.1 --eval-every 50 --eval-batches 8 --seeds "${SEEDS:-3}" \
  --variants ${VARIANTS:-agoq} --reuse --out "$out"
