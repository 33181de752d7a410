#!/usr/bin/env bash
# The main job: stock DeepSpeed and agoq side by side — same model, seed and data — on 2 CPU ranks
# with the deepspeed launcher, then a table of agoq/baseline ratios and a PNG of both loss curves.
#   STEPS=120 MODEL=small ZERO=2 PRECISION=auto ./scripts/demo.sh      (defaults shown)
# ZERO=1 for ZeRO-1. PRECISION=auto keeps the configs' bf16 on a CPU with native bf16 matmul
# (AVX512-BF16/AMX) and computes in fp32 on one without (AVX2-only), where torch's bf16 fallback is
# several times slower; the stored activation and gradient formats are the same either way.
# PRECISION=config always uses the configs' bf16, PRECISION=fp32 always fp32.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
steps="${STEPS:-120}"
model="${MODEL:-small}"
zero="${ZERO:-2}"
precision="${PRECISION:-auto}"
out="runs/demo"
mkdir -p "$out"
# Quiet the ranks' deprecation warnings without a pipe on stderr: tqdm draws its progress bar there
# with carriage returns, which a line filter would hold back until the run ends.
export PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning"
for variant in baseline agoq; do
  echo "=== ${variant}: ZeRO-${zero}, ${model} LLaMA, ${steps} steps, 2 ranks ==="
  deepspeed --num_accelerators 2 examples/pretrain_llama.py \
    --deepspeed_config "ds_configs/zero${zero}_${variant}.json" --precision "$precision" --fit-schedule \
    --model "$model" --steps "$steps" --label "$variant" --out "$out/${variant}.json" \
    | grep --line-buffered -v -E "real_accelerator|^\s*$"
done
python examples/compare_runs.py "$out/baseline.json" "$out/agoq.json" --plot "$out/loss.png" --json "$out/comparison.json"
