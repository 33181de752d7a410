"""The memory planner against measured bytes of real runs (activation and gradient predictions must
be within 5%, agoq's working set must cover what a step holds beyond its stored activations; ZeRO-3
shards and ZeRO-Offload host buffers within DeepSpeed's partition padding), named model sizes, and
the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agoq_ds.activation import ActivationQuantizer
from agoq_ds.cli import main
from agoq_ds.config import parse_agoq_config
from agoq_ds.planner import NAMED_MODELS, ModelDims, Parallelism, plan, working_set
from agoq_ds.testing.distributed import run_ranks
from agoq_ds.testing.live_bytes import measure_step
from agoq_ds.testing.models import SHAPES, build_llama
from tests.integration import engine_workers as w
from tests.planner import planner_workers as pw

TOL = 0.05


def _dims(shape: str) -> ModelDims:
    s = SHAPES[shape]
    return ModelDims(shape, s.vocab, s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate)


@pytest.mark.parametrize(
    "block", [{}, {"activation": {"policy": "uniform", "default_bits": 2}}], ids=["agoq", "uniform2"]
)
def test_activation_bytes_match_a_measured_forward(block: dict) -> None:
    cfg = parse_agoq_config(block)
    batch, seq = 2, 128
    model = build_llama("small", dtype=torch.bfloat16)
    quantizer = ActivationQuantizer(model, cfg.activation).install()
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the first step traces the structure
        model(input_ids=ids, labels=ids).loss.backward()
        quantizer.on_step_end()
    measured = quantizer.stats()
    (stage,) = plan(_dims("small"), Parallelism(seq_len=seq, micro_batch=batch), cfg)
    assert stage.activations["agoq"] == pytest.approx(measured["stored_bytes_per_forward"], rel=TOL)
    assert stage.activations["baseline"] == pytest.approx(measured["baseline_bytes_per_forward"], rel=TOL)


def test_working_set_covers_what_a_step_holds_beyond_its_stored_activations() -> None:
    """A replayed step's measured peak, forward and backward, against stored + working set."""
    batch, seq = 2, 256
    model = build_llama("small", dtype=torch.bfloat16)
    cfg = parse_agoq_config({})
    quantizer = ActivationQuantizer(model, cfg.activation).install()
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # traced, recorded: the measured step replays
        model(input_ids=ids, labels=ids).loss.backward()
        quantizer.on_step_end()
    step = measure_step(model, ids)
    stored = step["after_forward"]
    forward_peak, backward_peak = step["kept_peaks"]
    dims, par = _dims("small"), Parallelism(seq_len=seq, micro_batch=batch)
    (stage,) = plan(dims, par, cfg)
    work = working_set(dims, par, 0, dims.layers, cfg)
    assert stage.transient["agoq"] == work and stage.transient["baseline"] == 0
    assert stored == pytest.approx(stage.activations["agoq"], rel=TOL)
    # The gating product is computed while its two factors (activation output, up output) are
    # alive: three MLP-wide tensors at full width, at least, beside what is stored.
    mlp_tensor = batch * seq * SHAPES["small"].intermediate * 2
    assert 3 * mlp_tensor <= forward_peak - stored <= work
    # Backward, parameter gradients aside (the planner counts them with the gradient buffers).
    assert backward_peak <= stage.activations["agoq"] + work


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_boundary_peak_counts_the_fp32_buffer_beside_int8(zero: int) -> None:
    """At the accumulation boundary agoq's int8 state and the fp32 buffer it is reduced into (as large
    as stock's: the ZeRO-2/3 partition, else every gradient) coexist; the peak is the larger phase."""
    dims = NAMED_MODELS["llama-8b"]
    par = Parallelism(micro_batch=1, micro_batches=1, dp=8, zero=zero)
    (stage,) = plan(dims, par, parse_agoq_config({}))
    numel = stage.params // 8 if zero >= 2 else stage.params
    assert stage.gradients["baseline"] == stage.step_gradients["baseline"] == 4 * numel
    assert stage.step_gradients["agoq"] == stage.gradients["agoq"] + 4 * numel
    fixed = stage.weights + stage.optimizer
    # One bucket reduction in flight: in backward at ZeRO-2/3, at the boundary at ZeRO-1 (ZeRO-0's
    # chunked all-reduce is not counted). The largest bucket is the embedding's (525M elements, above
    # reduce_bucket_size), owned whole by one rank and stored round by round (2^24 elements in fp32).
    assert dims.vocab * dims.hidden > par.reduce_bucket_size
    assert stage.reduction == {"baseline": 0, "agoq": 0 if zero == 0 else 4 * 2**24 + 20 * 2**24}
    reducing = stage.reduction["agoq"]
    backward = stage.gradients["agoq"] + stage.activations["agoq"] + stage.transient["agoq"]
    backward += reducing if zero >= 2 else 0
    boundary = stage.step_gradients["agoq"] + (0 if zero >= 2 else reducing)
    assert stage.backward("agoq") == backward
    assert stage.total("agoq") == fixed + max(backward, boundary)
    (off,) = plan(dims, par, parse_agoq_config({"gradient": {"enabled": False}}))
    assert off.step_gradients["agoq"] == off.gradients["agoq"] == 4 * numel


def test_gradient_bytes_match_a_measured_zero2_run() -> None:
    result, _ = run_ranks(w.monitor_and_stats, 2, (w.ds_config(agoq={"activation": {"enabled": False}}), 2))
    stats = result["stats"]
    (stage,) = plan(_dims("tiny"), Parallelism(dp=2, zero=2), parse_agoq_config({}))
    assert stage.gradients["agoq"] == pytest.approx(stats["gradient/state_bytes"], rel=TOL)
    assert stage.gradients["baseline"] == pytest.approx(stats["gradient/buffer_bytes_fp32"], rel=TOL)


DP = 2
"""Data-parallel ranks of the measured ZeRO-3 and offload runs."""


def padding_bound(zero: int, tensors: int) -> int:
    """Most elements one rank's DeepSpeed partition can exceed the planner's ``params // dp`` by: ZeRO-1/2
    pad the flat param group to a multiple of ``2 dp`` (``nccl_start_alignment_factor``: under 2
    elements a rank), ZeRO-3 each tensor's shard to ``ceil(numel / dp)`` (under 1 element a tensor);
    plus the 1 the floor division drops."""
    return (2 if zero < 3 else tensors) + 1


def int8_bound(pad: int) -> int:
    """Most bytes ``pad`` more elements add to an int8 copy: their codes and the scales of the groups of
    128 they can open (a partial group at each end)."""
    return pad + 4 * (pad // 128 + 2)


def test_zero3_device_bytes_match_a_measured_run() -> None:
    """ZeRO-3 on 2 ranks: the planner's weight shards, optimizer state and agoq's int8 gradient
    partition (codes + scales + error-feedback residual) against what a real step allocated on each
    rank (``ds_tensor``, the fp32 partition and its Adam moments, the accumulator's noted bytes)."""
    block = {"activation": {"enabled": False}, "gradient": {"error_feedback": True}}
    ranks = run_ranks(pw.zero3_device_bytes, DP, (block,))
    (stage,) = plan(_dims("tiny"), Parallelism(dp=DP, zero=3), parse_agoq_config(block))
    for rank, r in enumerate(ranks):
        pad = padding_bound(3, r["tensors"])
        assert 0 <= r["partition_numel"] - stage.params // DP <= pad, (rank, r)
        # The plan counts bf16 weights (2 bytes); the run is fp32, so the shards are compared in elements.
        assert abs(stage.weights // 2 - r["weight_numel"]) <= pad, (rank, r)
        assert abs(stage.optimizer - r["optimizer_bytes"]) <= 12 * pad, (rank, r)
        # Codes + scales, twice: the error-feedback residual is an int8 copy of the same partition.
        assert r["ef_bytes"] * 2 == r["state_bytes"] > 0, (rank, r)
        assert abs(stage.gradients["agoq"] - r["state_bytes"]) <= 2 * int8_bound(pad), (rank, r)
        assert abs(stage.gradients["baseline"] - r["buffer_bytes_fp32"]) <= 4 * pad, (rank, r)
        assert stage.step_gradients["agoq"] == stage.gradients["agoq"] + stage.gradients["baseline"]


def test_offload_host_bytes_match_measured_buffers() -> None:
    """Optimizer offload at ZeRO-1, 2 and 3 on 2 ranks: the planner's host gradient bytes against
    DeepSpeed's fp32 host gradient buffers (``single_partition_of_fp32_groups[i].grad``; at ZeRO-3
    ``fp32_partitioned_groups_flat[i].grad`` and the host partition), measured on a stock engine and on
    agoq's after one step, agoq's staging against ``HostLink.state_bytes()``, the host optimizer state
    against the fp32 partition and its Adam moments, and at ZeRO-2/3 agoq's device int8 partition
    against its noted bytes (nothing fp32 is left on the device at the boundary: it is dequantized on
    the host). ZeRO-1's device figure (per-parameter int8 folds) is left out here: the tiny model's
    norm weights are below ``min_numel`` and fold in fp32, which the planner does not model."""
    block = {"activation": {"enabled": False}}
    ranks = run_ranks(pw.offload_host_bytes, DP, ((1, 2, 3), block))
    cfg = parse_agoq_config(block)
    for zero, optimizer in ((1, "AgoqZeroOptimizer"), (2, "AgoqZeroOptimizer"), (3, "AgoqStage3Optimizer")):
        (st,) = plan(_dims("tiny"), Parallelism(dp=DP, zero=zero, offload_optimizer="cpu"), cfg)
        assert st.optimizer == 0 and st.host_optimizer > 0
        copies = 2 if zero == 3 else 1  # fp32 host gradient, and at ZeRO-3 the host partition
        for rank, r in enumerate(result[zero] for result in ranks):
            assert r["optimizer"] == optimizer, r
            pad = padding_bound(zero, r["tensors"])
            assert 0 <= r["partition_numel"] - st.params // DP <= pad, (zero, rank, r)
            assert r["host_gradients"] == r["stock_host_gradients"] == copies * 4 * r["partition_numel"], r
            assert abs(st.host_gradients["baseline"] - r["stock_host_gradients"]) <= copies * 4 * pad, (zero, r)
            assert abs(st.host_staging - r["staging"]) <= int8_bound(pad), (zero, r)
            measured_agoq = r["host_gradients"] + r["staging"]
            assert abs(st.host_gradients["agoq"] - measured_agoq) <= copies * 4 * pad + int8_bound(pad), (zero, r)
            assert abs(st.host_optimizer - r["host_optimizer"]) <= 12 * pad, (zero, r)
            # The int8 partition is what crosses to the host, once a step.
            assert r["offload_bytes"] == r["staging"], (zero, r)
            if zero >= 2:  # it stays on the device across micro-batches
                assert abs(st.gradients["agoq"] - r["state_bytes"]) <= int8_bound(pad), (zero, r)
                assert st.step_gradients["agoq"] == st.gradients["agoq"]


def test_cli_plans_zero3_with_offload(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plan.json"
    args = ["plan", "--model", "llama-70b", "--dp", "8", "--zero", "3", "--offload-optimizer", "cpu"]
    assert main([*args, "--offload-param", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ZeRO-3 | optimizer offload cpu, param offload cpu" in text and "host per rank" in text, text
    data = json.loads(out.read_text())
    assert data["parallelism"] | {"zero": 3, "offload_optimizer": "cpu", "offload_param": "cpu"} == data["parallelism"]
    (stage,) = data["stages"]
    part = stage["params"] // 8
    # Weights and optimizer state on the host; the device keeps gradients and activations.
    assert stage["weights"] == stage["optimizer"] == 0
    assert stage["host_weights"] == 2 * part and stage["host_optimizer"] == 12 * part
    assert stage["host_gradients"] == {"baseline": 8 * part, "agoq": 8 * part + stage["host_staging"]}
    for v in ("baseline", "agoq"):
        assert stage["host_total"][v] == stage["host_weights"] + stage["host_optimizer"] + stage["host_gradients"][v]
        backward = stage["gradients"][v] + stage["activations"][v] + stage["transient"][v] + stage["reduction"][v]
        assert stage["device_peak"][v] == max(backward, stage["step_gradients"][v])  # ZeRO-3 reduces in backward
    # Stock ZeRO-3 offload keeps its gradient partition on the host; agoq keeps it in int8 on the device.
    assert stage["gradients"]["baseline"] == 0 < stage["gradients"]["agoq"] < part * 1.1


def test_offload_param_below_zero3_is_an_error(capsys) -> None:
    for zero in (0, 1, 2):
        with pytest.raises(ValueError, match=f"offload_param='cpu' at ZeRO-{zero}: DeepSpeed offloads parameters only"):
            Parallelism(zero=zero, offload_param="cpu")
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "--zero", str(zero), "--offload-param", "cpu"])
        assert exit_info.value.code == 2
        assert "DeepSpeed offloads parameters only at ZeRO-3" in capsys.readouterr().err
    with pytest.raises(ValueError, match="offload_optimizer='cpu' at ZeRO-0"):
        Parallelism(zero=0, offload_optimizer="cpu")
    with pytest.raises(ValueError, match="zero=4"):
        Parallelism(zero=4)


def test_named_sizes_have_their_parameter_counts() -> None:
    expected = {"llama-8b": 8.03e9, "llama-13b": 13.0e9, "llama-32b": 32.8e9, "llama-70b": 70.6e9}
    for name, count in expected.items():
        assert NAMED_MODELS[name].params() == pytest.approx(count, rel=0.01), name


def test_pipeline_stages_hold_1f1b_micro_batches() -> None:
    stages = plan(NAMED_MODELS["llama-8b"], Parallelism(pp=4, micro_batches=8, dp=8))
    assert [s.holds for s in stages] == [4, 3, 2, 2]
    assert sum(s.layers for s in stages) == 32
    for s in stages:
        assert s.total("agoq") < s.total("baseline")


def test_cli_writes_json_and_chart(tmp_path: Path) -> None:
    out, chart = tmp_path / "plan.json", tmp_path / "plan.png"
    cmd = [
        sys.executable,
        "-m",
        "agoq_ds",
        "plan",
        "--model",
        "llama-13b",
        "--pp",
        "2",
        "--dp",
        "4",
        "--json",
        str(out),
        "--chart",
        str(chart),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "peak GPU" in proc.stdout
    data = json.loads(out.read_text())
    assert len(data["stages"]) == 2 and chart.stat().st_size > 1000
