"""benchmarks/bench_pack_overhead.py runs and counts what it divides by (the figure itself is a
benchmark result, docs/results.md, not a timed test)."""

from __future__ import annotations

import math
from pathlib import Path

from tests.benchmark_scripts import load_benchmark


def test_pack_overhead_smoke(tmp_path: Path) -> None:
    module = load_benchmark("bench_pack_overhead")
    result = module.main(["--rounds", "2", "--out", str(tmp_path / "po.json")])
    assert result["saved_tensors_per_forward"] >= 20  # the tiny LLaMA's layers save dozens of tensors
    assert result["stock_step_ms"] > 0 and result["agoq_step_ms"] > 0
    assert math.isfinite(result["overhead_us_per_saved_tensor"])
    # Backward recomputes the norm outputs, the SiLU output and the gating product of each of the 2 layers.
    assert result["recipes_per_forward"] >= 2 * 4
    assert result["recipe_us_per_stored_span"] > 0
    assert (tmp_path / "po.json").is_file()
