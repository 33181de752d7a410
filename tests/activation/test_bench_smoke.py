"""benchmarks/bench_activation.py runs end to end on short sequences (so it cannot rot)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchmark_scripts import load_benchmark


def test_bench_activation_smoke(tmp_path: Path) -> None:
    bench = load_benchmark("bench_activation")
    out = tmp_path / "bench.json"
    argv = ["--batch", "1", "--seq", "64", "--steps", "1", "--train-steps", "2", "--train-seq", "32", "--out", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    configs = data["memory"]["configs"]
    assert set(configs) == set(bench.MEMORY_CONFIGS)
    assert configs["none"]["ratio_vs_bf16_model"] == 1.0
    assert configs["uniform 4-bit"]["stored_bytes"] < configs["agoq default"]["stored_bytes"]
    # every tensor agoq stores is 8-bit, the rest is recomputed (as under uniform 8-bit)
    assert configs["agoq default"]["stored_bytes"] <= configs["uniform 8-bit"]["stored_bytes"]
    assert configs["budget 4.0 bits"]["avg_bits"] <= 4.0
    assert set(data["training"]["runs"]) == set(bench.TRAIN_CONFIGS)
    assert out.with_suffix(".png").stat().st_size > 0
