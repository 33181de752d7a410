"""benchmarks/gpu_step.py's logic, on the CPU (gloo, the ``tiny`` shape): every variant trains in its
own process from the same initialisation and batches, and the record carries what the GPU run reports."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    module = load_benchmark("gpu_step")
    out = tmp_path_factory.mktemp("gpu_step") / "gpu_step.json"
    argv = ["--device", "cpu", "--shapes", "tiny", "--variants", "stock", "agoq", "agoq-ckpt"]
    return module.main([*argv, "--steps", "2", "--warmup", "1", "--out", str(out)])


def test_every_variant_ran(result: dict) -> None:
    records = {r["variant"]: r for r in result["records"]}
    assert set(records) == {"stock", "agoq", "agoq-ckpt"}
    for name, r in records.items():
        assert "error" not in r, r.get("error")
        assert r["engine"] == ("DeepSpeedEngine" if name == "stock" else "AgoqEngine")
        assert len(r["loss"]) == 2 and all(math.isfinite(x) for x in r["loss"])
        assert r["median_step_s"] > 0 and r["tokens_per_s"] > 0 and r["planner_peak_gib"] > 0


def test_replay_and_backends_reported(result: dict) -> None:
    """Each record says whether plan replay engaged (replayed of all outermost forwards) and which
    backend the engine's kernels pick per op and width; stock has neither."""
    records = {r["variant"]: r for r in result["records"]}
    assert records["stock"]["replay_engaged"] is None and records["stock"]["backends"] == {}
    agoq = records["agoq"]
    assert agoq["replay_engaged"] is True and 1 <= agoq["replayed_forwards"] < agoq["replay_forwards"]
    assert set(agoq["backends"]) == {f"{op}/{n}" for op in ("quantize", "dequantize") for n in (2, 4, 8)}
    assert all(not v.startswith("error") for v in agoq["backends"].values()), agoq["backends"]


def test_same_start_and_no_extra_host_syncs(result: dict) -> None:
    records = {r["variant"]: r for r in result["records"]}
    # Same initialisation and batches; saved-tensor storage does not touch the forward, and the first
    # step's losses are computed before the first update.
    assert records["agoq"]["loss"][0] == records["stock"]["loss"][0]
    assert records["agoq"]["host_syncs_per_step"] <= records["stock"]["host_syncs_per_step"]


def test_zero3_adds_no_host_synchronisation(tmp_path: Path) -> None:
    """At ZeRO-3 (``--zero-stage 3``) agoq's 8-bit reduce-scatter and int8 partition wait on the host
    no more often than stock DeepSpeed's stage-3 step: the CPU proxy of the GPU check."""
    module = load_benchmark("gpu_step")
    argv = ["--device", "cpu", "--shapes", "tiny", "--variants", "stock", "agoq", "--zero-stage", "3"]
    result = module.main([*argv, "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "zero3.json")])
    records = {r["variant"]: r for r in result["records"]}
    for r in records.values():
        assert "error" not in r, r.get("error")
    assert records["agoq"]["loss"][0] == records["stock"]["loss"][0]
    assert records["agoq"]["host_syncs_per_step"] <= records["stock"]["host_syncs_per_step"]
