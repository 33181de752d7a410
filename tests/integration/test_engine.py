"""The AGoQ engine inside real DeepSpeed on real gloo ranks: selection, errors at initialize,
statistics and monitor events, checkpoints (resume and stock interoperability)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from agoq_ds.testing.distributed import run_ranks
from tests.integration import engine_workers as w

AGOQ = {"activation": {"min_numel": 1024}, "gradient": {}}


def test_initialize_returns_the_engine_the_config_asks_for() -> None:
    cases = {
        "no block": (w.ds_config(), False, "DeepSpeedEngine"),
        "agoq block": (w.ds_config(agoq=AGOQ), False, "AgoqEngine"),
        "block switched off": (w.ds_config(agoq={"enabled": False}), False, "DeepSpeedEngine"),
        "explicit, no block": (w.ds_config(), True, "AgoqEngine"),
        "ZeRO-1": (w.ds_config(stage=1, agoq=AGOQ), False, "AgoqEngine"),
    }
    for name, (config, explicit, expected) in cases.items():
        (got,) = run_ranks(w.engine_type, 1, (config, explicit))
        assert got == expected, name


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            w.ds_config(agoq={"activation": {"default_bits": 3}}),
            "agoq.activation.default_bits=3: must be one of 2, 4, 8",
        ),
        (w.ds_config(agoq={"gradient": {"group_siz": 64}}), "did you mean 'group_size'?"),
        (
            w.ds_config(agoq=AGOQ, zero_optimization={"stage": 3, "zero_quantized_gradients": True}),
            "zero_optimization.zero_quantized_gradients",
        ),
        (w.ds_config(agoq={"kernel_backend": "cuda"}), "agoq.kernel_backend='cuda'"),
        (
            w.ds_config(
                agoq={"gradient": {"enabled": True}},
                zero_optimization={"stage": 0, "offload_optimizer": {"device": "cpu"}},
            ),
            "offload_optimizer",
        ),
    ],
    ids=["bad-bits", "misspelt-key", "zero3-qgz", "unavailable-backend", "stage0-offload-with-explicit-8bit-gradients"],
)
def test_bad_input_fails_at_initialize_with_a_clear_message(config: dict, expected: str) -> None:
    (message,) = run_ranks(w.initialize_error, 1, (config,))
    assert expected in message, message


@pytest.mark.parametrize(
    "zero",
    [
        {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
    ],
    ids=["zero2-offload-optimizer", "zero3-offload-optimizer-and-param"],
)
def test_offload_trains_with_the_default_block(zero: dict) -> None:
    """``"agoq": {}`` with DeepSpeed's CPU offload: activations are stored quantized and gradients cross
    to the host in 8 bits, once per step."""
    config = w.ds_config(agoq={}, zero_optimization={**zero, "reduce_bucket_size": 200_000})
    (out,) = run_ranks(w.offload_outcome, 1, (config,))
    assert out["engine"] == "AgoqEngine" and out["gradient_path"], out
    assert 0 < out["offload_bytes"] < 0.3 * out["offload_bytes_baseline"], out
    assert out["avg_bits"] < 9.0, out  # stored activations at the default 4/8 bits
    losses = out["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] != losses[0], losses


def test_assert_active() -> None:
    (stock,) = run_ranks(w.assert_active_outcome, 1, (w.ds_config(),))
    assert "agoq-ds is not active" in stock
    (agoq,) = run_ranks(w.assert_active_outcome, 1, (w.ds_config(agoq=AGOQ),))
    assert agoq == "active"


def test_statistics_reach_the_monitor(tmp_path: Path) -> None:
    monitor = {"enabled": True, "output_path": str(tmp_path), "job_name": "agoq"}
    config = w.ds_config(agoq=AGOQ, steps_per_print=2, csv_monitor=monitor)
    result, _ = run_ranks(w.monitor_and_stats, 2, (config, 4))
    stats = result["stats"]
    assert stats["activation/compression"] > 2.5
    assert stats["gradient/comm_bytes_ratio_bf16"] <= 0.53
    assert "attn_core" in result["report"]
    files = {p.name: p for p in (tmp_path / "agoq").glob("Train_agoq_*.csv")}
    for key in ("activation/avg_bits", "gradient/comm_bytes", "gradient/buffer_bytes"):
        name = "Train_agoq_" + key.replace("/", "_") + ".csv"
        assert name in files, sorted(files)
        rows = list(csv.reader(files[name].open()))
        assert len(rows) >= 3, rows  # header + steps 2 and 4


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    config = w.ds_config(agoq=AGOQ)
    straight = run_ranks(w.uninterrupted, 2, (config, 6))
    resumed = run_ranks(w.save_then_resume, 2, (config, 6, str(tmp_path), config))
    for rank in range(2):
        assert resumed[rank]["loaded"] and resumed[rank]["params_match"]
        assert resumed[rank]["agoq_state_restored"]
        assert "agoq" not in resumed[rank]["client_keys"]  # consumed by the engine, not left to the user
        assert resumed[rank]["losses"] == pytest.approx(straight[rank], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("save_with", "load_with"),
    [(AGOQ, None), (None, AGOQ)],
    ids=["agoq-checkpoint-into-stock", "stock-checkpoint-into-agoq"],
)
def test_checkpoints_interoperate_with_stock_deepspeed(tmp_path: Path, save_with, load_with) -> None:
    results = run_ranks(
        w.save_then_resume, 2, (w.ds_config(agoq=save_with), 4, str(tmp_path), w.ds_config(agoq=load_with))
    )
    for result in results:
        assert result["loaded"] and result["params_match"]
        assert all(loss == loss and loss < 10 for loss in result["losses"])


def test_activation_storage_is_the_same_at_every_zero_stage() -> None:
    """ZeRO-3 hands every module fresh aliases of its inputs and outputs (its parameter-gathering
    hooks) and releases the norm weights the recipes of their outputs read; deduplication (the q/k/v
    projections' shared input) and recomputation (norm outputs, the MLP's activation output and
    gating product) must survive that: the same model and batches store the same bytes, class by
    class and module by module, at stages 0 to 3, recorded and replayed forwards alike; with offload
    too (ZeRO-2 optimizer offload; ZeRO-3 optimizer and parameter offload, where the norm weights the
    recipes read live on the host between uses)."""
    config = {"gradient": {"enabled": False}, "activation": {"min_numel": 1024}}
    configs = {stage: w.ds_config(stage=stage, agoq=config) for stage in range(4)}
    host = {"device": "cpu"}
    for stage, offload in ((2, {"offload_optimizer": host}), (3, {"offload_optimizer": host, "offload_param": host})):
        zero = {"stage": stage, "reduce_bucket_size": 200_000, **offload}
        configs[f"{stage} offload"] = w.ds_config(stage=stage, agoq=config, zero_optimization=zero)
    results = {stage: run_ranks(w.activation_storage, 1, (cfg, 3))[0] for stage, cfg in configs.items()}
    reference = results[2]
    assert reference["replayed"] >= 2  # step 3's micro-batches follow the plan recorded in step 2
    stats = reference["stats"]
    assert stats["class/mlp_act/avg_bits"] < 6  # 8-bit gate and up outputs; the SiLU output recomputed
    assert stats["class/down_proj_input/stored_bytes"] == stats["class/qkv_input/stored_bytes"] == 0  # recomputed
    for stage, got in results.items():
        assert got["classes"] == reference["classes"], f"stage {stage} classifies differently"
        assert got["stats"] == reference["stats"], f"stage {stage} stores differently"
        assert got["replayed"] == reference["replayed"]
