"""benchmarks/bench_pack_overhead.py runs and counts what it divides by (the figure itself is a
benchmark result, docs/results.md, not a timed test)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pack_overhead.py"


def test_pack_overhead_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_pack_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = module.main(["--rounds", "2", "--out", str(tmp_path / "po.json")])
    assert result["saved_tensors_per_forward"] >= 20  # the tiny LLaMA's layers save dozens of tensors
    assert result["stock_step_ms"] > 0 and result["agoq_step_ms"] > 0
    assert math.isfinite(result["overhead_us_per_saved_tensor"])
    assert (tmp_path / "po.json").is_file()
