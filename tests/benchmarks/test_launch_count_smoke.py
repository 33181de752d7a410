"""benchmarks/launch_count.py counts what a GPU would launch (2 layers here; the 16-layer figure is a
benchmark result in docs/results.md): agoq adds one quantize per stored span in forward and one
dequantize per stored span in backward, and the fused rebuild replaces the recipes' ops and the
dequantize of every span it reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from agoq_ds.gpu_cost import model_step_cost
from agoq_ds.planner import ModelDims
from agoq_ds.testing.models import llama_config
from tests.benchmark_scripts import load_benchmark


def test_launch_count_smoke(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    module = load_benchmark("launch_count")
    result = module.main(["--layers", "2", "--micro-batches", "1", "--out", str(tmp_path / "lc.json")])
    runs = result["runs"]
    stock, unfused, fused = (runs[m] for m in ("stock", "unfused", "fused"))
    assert unfused["replayed_forwards"] >= 1 and fused["replayed_forwards"] >= 1
    quantized = unfused["ops"]["quantize"]
    assert quantized >= 2 * 8 and unfused["ops"]["dequantize"] == quantized  # each stored span once
    rebuilt = fused["ops"]["triton_norm"] + fused["ops"]["triton_gate"]
    assert rebuilt >= 2 * 3  # two norms and one gating product per layer
    assert fused["ops"].get("silu", 0) == stock["ops"].get("silu", 0)  # no SiLU recomputed op by op
    assert fused["ops"]["dequantize"] < quantized  # spans read inside the fused kernels
    assert stock["launches"] < fused["launches"] < unfused["launches"]
    assert (tmp_path / "lc.json").is_file()

    # The modelled GPU cost (agoq-ds cost) counts the same launches, kind by kind.
    c = llama_config("tiny", num_hidden_layers=2)
    dims = ModelDims(
        "tiny", c.vocab_size, c.hidden_size, 2, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    )
    for mode in ("unfused", "fused"):
        extra = {k: v - stock["ops"].get(k, 0) for k, v in runs[mode]["ops"].items()}
        extra = {k: v for k, v in extra.items() if v}
        modelled = model_step_cost(dims, seq=64, micro=2, gas=1, state=mode).launches
        assert extra == modelled, (mode, extra, modelled)
