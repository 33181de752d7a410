#!/usr/bin/env bash
# The main job: stock DeepSpeed and agoq side by side — same model, seed and data — on 2 CPU ranks
# with the deepspeed launcher, then a table of agoq/baseline ratios and a PNG of both loss curves.
#   STEPS=200 MODEL=small ZERO=2 ./scripts/demo.sh      (defaults shown; ZERO=1 for ZeRO-1)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
steps="${STEPS:-200}"
model="${MODEL:-small}"
zero="${ZERO:-2}"
out="runs/demo"
mkdir -p "$out"
for variant in baseline agoq; do
  echo "=== ${variant}: ZeRO-${zero}, ${model} LLaMA, ${steps} steps, 2 ranks ==="
  deepspeed --num_accelerators 2 examples/pretrain_llama.py \
    --deepspeed_config "ds_configs/zero${zero}_${variant}.json" \
    --model "$model" --steps "$steps" --label "$variant" --out "$out/${variant}.json" 2>&1 \
    | grep -v -E "FutureWarning|return func\(|real_accelerator|^\s*$"
done
python examples/compare_runs.py "$out/baseline.json" "$out/agoq.json" --plot "$out/loss.png" --json "$out/comparison.json"
