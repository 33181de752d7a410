"""benchmarks/compile_step.py runs its four configurations and reports their ratios (the figures are
benchmark results, docs/results.md, not timed tests)."""

from __future__ import annotations

import math
from pathlib import Path

from tests.benchmark_scripts import load_benchmark


def test_compile_step_smoke(tmp_path: Path) -> None:
    module = load_benchmark("compile_step")
    result = module.main(
        ["--model", "tiny", "--seq-len", "32", "--warmup", "2", "--steps", "2", "--out", str(tmp_path / "cs.json")]
    )
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values()), result["ratios"]
    assert result["runs"]["agoq compiled"]["compiled_runs"] >= 2  # steps after the eager first one
    assert 0.75 <= result["ratios"]["stored_bytes_compiled_vs_eager"] <= 1.25
    assert (tmp_path / "cs.json").is_file() and (tmp_path / "cs.png").is_file()
