"""benchmarks/offload.py runs stock and agoq with ZeRO-Offload at ZeRO-2 and ZeRO-3 and reports the
gradient bytes each moves to the host (the figures are benchmark results, docs/results.md)."""

from __future__ import annotations

from pathlib import Path

from tests.benchmark_scripts import load_benchmark


def test_offload_smoke(tmp_path: Path) -> None:
    module = load_benchmark("offload")
    out = tmp_path / "offload.json"
    argv = ["--model", "tiny", "--seq-len", "32", "--dtype", "fp32", "--warmup", "1", "--steps", "1"]
    result = module.main([*argv, "--configs", "2:8", "3:1", "--out", str(out)])
    assert [(r["stage"], r["grad_accum"]) for r in result["rows"]] == [(2, 8), (3, 1)]
    for row in result["rows"]:
        assert row["agoq"]["optimizer"] in ("AgoqZeroOptimizer", "AgoqStage3Optimizer"), row["agoq"]
        # int8 codes + scales once per step against stock's fp32 boundary copy and, with accumulation,
        # its round trips of the running sum.
        assert 0 < row["offload_bytes_ratio"] <= (0.1 if row["grad_accum"] == 8 else 0.3), row
    assert out.is_file() and out.with_suffix(".png").is_file()
