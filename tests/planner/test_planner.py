"""The memory planner against measured bytes of real runs (activation and gradient predictions must
be within 5%, agoq's working set must cover what a step holds beyond its stored activations), named
model sizes, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agoq_ds.activation import ActivationQuantizer
from agoq_ds.config import parse_agoq_config
from agoq_ds.planner import NAMED_MODELS, ModelDims, Parallelism, plan, working_set
from agoq_ds.testing.distributed import run_ranks
from agoq_ds.testing.live_bytes import measure_step
from agoq_ds.testing.models import SHAPES, build_llama
from tests.integration import engine_workers as w

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


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_boundary_peak_counts_the_fp32_buffer_beside_int8(zero: int) -> None:
    """At the accumulation boundary agoq's int8 state and the fp32 buffer it is reduced into (as large
    as stock's: the ZeRO-2 partition, else every gradient) coexist; the peak is the larger phase."""
    dims = NAMED_MODELS["llama-8b"]
    par = Parallelism(micro_batch=1, micro_batches=1, dp=8, zero=zero)
    (stage,) = plan(dims, par, parse_agoq_config({}))
    numel = stage.params // 8 if zero == 2 else stage.params
    assert stage.gradients["baseline"] == stage.step_gradients["baseline"] == 4 * numel
    assert stage.step_gradients["agoq"] == stage.gradients["agoq"] + 4 * numel
    fixed = stage.weights + stage.optimizer
    backward = stage.gradients["agoq"] + stage.activations["agoq"] + stage.transient["agoq"]
    assert stage.backward("agoq") == backward
    assert stage.total("agoq") == fixed + max(backward, stage.step_gradients["agoq"])
    (off,) = plan(dims, par, parse_agoq_config({"gradient": {"enabled": False}}))
    assert off.step_gradients["agoq"] == off.gradients["agoq"] == 4 * numel


def test_gradient_bytes_match_a_measured_zero2_run() -> None:
    result, _ = run_ranks(w.monitor_and_stats, 2, (w.ds_config(agoq={"activation": {"enabled": False}}), 2))
    stats = result["stats"]
    (stage,) = plan(_dims("tiny"), Parallelism(dp=2, zero=2), parse_agoq_config({}))
    assert stage.gradients["agoq"] == pytest.approx(stats["gradient/state_bytes"], rel=TOL)
    assert stage.gradients["baseline"] == pytest.approx(stats["gradient/buffer_bytes_fp32"], rel=TOL)


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
