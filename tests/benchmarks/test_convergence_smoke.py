"""benchmarks/convergence.py runs end to end in a tiny mode (so it cannot rot): the real deepspeed
launcher, stock and agoq, two optimizer steps, JSON + PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark


def test_variant_configs() -> None:
    bench = load_benchmark("convergence")
    args = bench.parse_args(["--steps", "40"])
    configs = {v.slug: bench.ds_config(v, args) for v in bench.VARIANTS}
    assert "agoq" not in configs["stock"]
    assert configs["agoq"]["agoq"] == {}
    assert configs["grad_only"]["agoq"] == {"activation": {"enabled": False}}
    assert configs["uniform2"]["agoq"]["activation"] == {"policy": "uniform", "default_bits": 2}
    for cfg in configs.values():  # identical training setup apart from the agoq block
        assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"]
        assert cfg["scheduler"]["params"]["total_num_steps"] == 40
        assert {k: v for k, v in cfg.items() if k != "agoq"} == {k: v for k, v in configs["stock"].items()}
    fp32 = bench.ds_config(bench.EXTRAS["stock_fp32grad"], args)
    assert "agoq" not in fp32 and fp32["data_types"] == {"grad_accum_dtype": "fp32"}
    assert fp32["communication_data_type"] == "fp32"


def test_convergence_smoke(tmp_path: Path) -> None:
    bench = load_benchmark("convergence")
    argv = ["--model", "tiny", "--steps", "2", "--seq-len", "32", "--eval-every", "1", "--eval-batches", "1"]
    argv += ["--variants", "agoq", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "convergence.json").read_text())
    assert set(result["summary"]) == {"stock", "agoq"}
    assert result["machine"]["nproc"] and result["machine"]["load_average"]
    for curve in result["curves"].values():
        assert len(curve["loss"]) == 2 and [s for s, _ in curve["heldout"]] == [1, 2]
    agoq, stock = result["summary"]["agoq"], result["summary"]["stock"]
    assert agoq["activation_bytes_per_micro_batch"] < stock["activation_bytes_per_micro_batch"]
    assert agoq["comm_bytes_per_step"] < stock["comm_bytes_per_step"]
    assert result["target"]["limit"] == 0.01
    assert (tmp_path / "convergence.png").stat().st_size > 10_000


def test_paired_gaps_and_interval() -> None:
    bench = load_benchmark("convergence")

    def run(name: str, final: float) -> dict:
        return {"name": name, "heldout": [(10, 9.0), (20, final)]}

    runs_by_seed = [
        {"stock": run("stock", 2.00), "agoq": run("agoq", 2.02)},
        {"stock": run("stock", 2.10), "agoq": run("agoq", 2.1105)},
        {"stock": run("stock", 1.90), "agoq": run("agoq", 1.9095)},
    ]
    gap = bench.paired_gaps(runs_by_seed)["agoq"]
    assert gap["gaps"] == [2.02 / 2.00 - 1, 2.1105 / 2.10 - 1, 1.9095 / 1.90 - 1]
    mean = (0.01 + 0.005 + 0.005) / 3
    assert abs(gap["mean"] - mean) < 1e-12
    half = 4.303 * 0.002886751 / 3**0.5  # t(0.975, 2) * sample stdev / sqrt(n)
    assert abs(gap["ci95"][1] - (mean + half)) < 1e-6 and abs(gap["ci95"][0] - (mean - half)) < 1e-6


def test_custom_variants_and_stock_reuse_key(tmp_path: Path) -> None:
    bench = load_benchmark("convergence")
    args = bench.parse_args(["--agoq", 'mlp4={"activation": {"class_bits": {"mlp_act": 4}}}'])
    (variant,) = args.agoq
    assert variant.slug == "mlp4"
    assert bench.ds_config(variant, args)["agoq"]["activation"]["class_bits"] == {"mlp_act": 4}
    for bad in ("mlp4", "4x={}", "x=[1]", "x={"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--agoq", bad])
    # A stock run is reused across code versions that agree on what it runs (model, data, loop)...
    stock, agoq = bench.VARIANTS[0], bench.VARIANTS[1]
    code = tmp_path / "snapshot"
    for f in bench.STOCK_CODE:
        (code / f).parent.mkdir(parents=True, exist_ok=True)
        (code / f).write_bytes((bench.ROOT / f).read_bytes())
    args.code = code
    here = bench.settings(args, stock)
    args.code = None
    assert bench.settings(args, stock) == here
    (code / bench.STOCK_CODE[0]).write_text("# changed\n")
    args.code = code
    assert bench.settings(args, stock) != here
    # ... an agoq run only on the same code
    assert bench.settings(args, agoq)["code"] == str(code)
