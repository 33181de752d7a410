#!/usr/bin/env bash
# Creates/refreshes the project venv (.venv) with pinned dependencies and builds the kernels.
# Idempotent: does nothing when the inputs (requirements, setup, csrc) are unchanged.
#   AGOQ_PYTHON=python3.11   interpreter to create the venv with (default: python3)
#   AGOQ_KEEP_TORCH=1        keep the torch already in the venv (e.g. a CUDA build) instead of the pin
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv="$root/.venv"
py="${AGOQ_PYTHON:-python3}"
stamp="$venv/.agoq-stamp"
inputs=$(cat requirements/*.txt pyproject.toml setup.py agoq_ds/quant/builder.py csrc/*/* 2>/dev/null | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
  exit 0
fi
echo "[bootstrap] setting up $venv (first run takes a few minutes)"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if [ "${AGOQ_KEEP_TORCH:-0}" = "1" ] && "$venv/bin/python" -c "import torch" 2>/dev/null; then
  constraints=()
else
  "${pip[@]}" install -c requirements/constraints.txt torch
  constraints=(-c requirements/constraints.txt)
fi
"${pip[@]}" install "${constraints[@]}" -r requirements/dev.txt
# Benchmark peers (bitsandbytes, torchao) outside the venv: see requirements/bench.txt.
rm -rf "$root/.peers"
"${pip[@]}" install --no-deps --target "$root/.peers" "${constraints[@]}" -r requirements/bench.txt
export DS_BUILD_OPS=0
export TORCH_EXTENSIONS_DIR="$root/.torch_extensions"
"${pip[@]}" install --no-build-isolation --no-deps -e .
echo "$inputs" > "$stamp"
echo "[bootstrap] done"
