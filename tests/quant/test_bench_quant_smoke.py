"""benchmarks/bench_quant.py runs end to end on a tiny tensor (so it cannot rot)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark


def test_bench_quant_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("bench_quant")
    out = tmp_path / "bench.json"
    result = bench.main(["--numel", "5000", "--reps", "1", "--no-compile", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "memcpy fp32" in printed and "/memcpy" in printed
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert out.with_suffix(".png").stat().st_size > 0
    rows = data["results"]
    impls = {r["impl"] for r in rows}
    assert bench.EAGER in impls
    # Every implementation ran both ops on every (dtype, bits) case, with positive throughput.
    assert len(rows) == len(impls) * 2 * 2 * 2
    for r in rows:
        assert r["gbps"] > 0 and r["memcpy_gbps"] > 0
        assert r["vs_memcpy"] == pytest.approx(r["gbps"] / r["memcpy_gbps"])
        eager = next(
            e
            for e in rows
            if e["impl"] == bench.EAGER and e["op"] == r["op"] and e["dtype"] == r["dtype"] and e["bits"] == r["bits"]
        )
        assert r["vs_eager"] == pytest.approx(r["gbps"] / eager["gbps"])
    # Bytes counted: 5000 fp32 in + 2500 int4 codes + 40 fp32 scales out.
    int4 = next(r for r in rows if r["dtype"] == "fp32" and r["bits"] == 4 and r["op"] == "quantize")
    assert int4["gbps"] == pytest.approx((5000 * 4 + 2500 + 40 * 4) / (int4["ms"] / 1e3) / 1e9)
