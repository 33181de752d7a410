"""benchmarks/bench_peers.py runs end to end on small tensors: agoq's CPU kernels and every peer
family are either measured or listed as unavailable with a reason, on the same inputs."""

from __future__ import annotations

import json

import pytest

from tests.benchmark_scripts import load_benchmark

NUMEL = 8192


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict, str]:
    bench = load_benchmark("bench_peers")
    out = tmp_path_factory.mktemp("peers") / "peers.json"
    # --no-malloc-tuning: mallopt is process-wide and would outlive this test in the pytest process.
    argv = ["--numel", str(NUMEL), "--reps", "1", "--no-compile", "--threads", "1", "--no-malloc-tuning"]
    result = bench.main([*argv, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert out.with_suffix(".png").stat().st_size > 0
    return bench, data, str(out)


def _rows(data: dict, impl: str, **kw) -> list[dict]:
    return [r for r in data["results"] if r["impl"] == impl and all(r[k] == v for k, v in kw.items())]


def test_agoq_backends_measured(run) -> None:
    _, data, _ = run
    from agoq_ds.quant import all_status

    cpu = [s.name for s in all_status() if s.available and "cpu" in s.device_types]
    assert "torch" in cpu
    for name in cpu:
        impl = f"agoq {name}" + (" (eager reference)" if name == "torch" else "")
        rows = _rows(data, impl)
        assert len(rows) == 2 * 2 * 2  # dtypes x widths x (quantize, dequantize)
    # Backends implement one format: the same error on the same inputs.
    for bits in (8, 4):
        ref = _rows(data, "agoq torch (eager reference)", bits=bits, dtype="fp32")[0]["error"]
        for name in cpu:
            impl = f"agoq {name}" + (" (eager reference)" if name == "torch" else "")
            err = _rows(data, impl, bits=bits, dtype="fp32")[0]["error"]
            assert err["normal"]["rel_l2"] == pytest.approx(ref["normal"]["rel_l2"], rel=1e-3)
        assert ref["normal"]["rel_l2"] < (0.01 if bits == 8 else 0.15)


def test_every_peer_measured_or_reported(run) -> None:
    bench, data, _ = run
    impls = {r["impl"] for r in data["results"]}
    missing = {m["impl"]: m["reason"] for m in data["unavailable"]}
    for family in bench.PEERS:
        measured = any(i.startswith(family) for i in impls)
        assert measured or family in missing, f"{family} neither measured nor reported"
        if family in missing:
            assert missing[family]  # a reason is given
    assert all(m["reason"] for m in data["unavailable"])


def test_throughput_accounting(run) -> None:
    _, data, _ = run
    for r in data["results"]:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["memcpy_gbps"] > 0
        in_bytes = NUMEL * (4 if r["dtype"] == "fp32" else 2)
        stored = r["stored_bits_per_element"] * NUMEL / 8
        assert r["gbps"] == pytest.approx((in_bytes + stored) / (r["ms"] / 1e3) / 1e9)
        assert r["input_gbps"] == pytest.approx(in_bytes / (r["ms"] / 1e3) / 1e9)
        for inp in ("normal", "outliers"):
            assert 0 < r["error"][inp]["rel_l2"] < 0.5 and r["error"][inp]["max_abs"] > 0
    agoq4 = _rows(data, "agoq torch (eager reference)", bits=4, dtype="fp32")[0]
    assert agoq4["stored_bits_per_element"] == pytest.approx(4 + 32 / 128)  # packed codes + fp32 scale per block


def test_same_scheme_same_error(run) -> None:
    """torchao's symmetric per-block int8 is agoq's int8 format: equal error on the same input."""
    _, data, _ = run
    ao = _rows(data, "torchao quantize_affine", bits=8, dtype="fp32")
    if not ao:
        pytest.skip("torchao not installed (scripts/bootstrap.sh puts the peers in .peers/: requirements/bench.txt)")
    agoq = _rows(data, "agoq torch (eager reference)", bits=8, dtype="fp32")[0]
    assert ao[0]["error"]["normal"]["rel_l2"] == pytest.approx(agoq["error"]["normal"]["rel_l2"], rel=0.02)
