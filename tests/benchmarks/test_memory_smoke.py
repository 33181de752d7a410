"""benchmarks/memory.py and benchmarks/plan_table.py run end to end in a tiny mode (so they cannot
rot), and the measured bytes agree with the planner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_memory_smoke(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    # A subprocess, as a user runs it: its rank processes must import the benchmark's functions.
    cmd = [sys.executable, str(BENCHMARKS / "memory.py"), "--models", "tiny", "--steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["setups"]["tiny"]
    stock, agoq = res["measured"]["stock"]["rank0"], res["measured"]["agoq"]["rank0"]
    assert stock["engine"] == "DeepSpeedEngine" and agoq["engine"].startswith("Agoq")
    assert agoq["activations"] < 0.6 * stock["activations"]
    assert agoq["gradients"] < 0.5 * stock["gradients"]
    assert agoq["comm_gradient"] < 0.6 * stock["comm_gradient"]
    assert agoq["optimizer"] == stock["optimizer"] and agoq["weights"] == stock["weights"]
    for variant, measured in (("stock", stock), ("agoq", agoq)):
        for key in ("activations", "gradients", "optimizer", "weights", "comm_gradient"):
            want = res["predicted"][variant][key]
            if variant == "stock" and key == "gradients":  # the planner assumes fp32 accumulation
                assert stock["gradient_dtype"] == "torch.bfloat16"
                want /= 2
                assert any("stock gradient buffers" in n for n in res["notes"])
            assert measured[key] == pytest.approx(want, rel=0.1), (variant, key)
    assert stock["peak_rss"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_plan_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench = load_benchmark("plan_table")
    out = tmp_path / "plan.json"
    assert bench.main(["--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["rows"]] == ["llama-8b", "llama-13b", "llama-32b"]
    for r in data["rows"]:
        assert r["parallelism"] == {**r["parallelism"], "pp": 4, "dp": 8, "zero": 1, "seq_len": 4096}
        assert 0.3 < r["reduction"] < 0.8
        assert r["agoq_peak_bytes"] < r["stock_peak_bytes"]
    assert "| LLaMA-3 8B |" in capsys.readouterr().out


def test_step_memory_smoke(tmp_path: Path) -> None:
    """benchmarks/step_memory.py: stock's stored bytes are the planner's, agoq's peak (gradients aside)
    is inside stored + working set and well below stock's."""
    bench = load_benchmark("step_memory")
    out = tmp_path / "step.json"
    res = bench.main(["--model", "small", "--seq-len", "64", "--out", str(out)])
    planned = res["planner"]
    assert res["stock"]["after_forward_bytes"] == pytest.approx(planned["stock_activation_bytes"], rel=0.05)
    assert res["agoq"]["after_forward_bytes"] == pytest.approx(planned["agoq_activation_bytes"], rel=0.05)
    assert res["agoq"]["peak_without_gradients_bytes"] <= planned["agoq_peak_bytes"]
    assert res["peak_ratio"] < 0.6
    assert json.loads(out.read_text())["model"] == "small" and out.with_suffix(".png").stat().st_size > 10_000
