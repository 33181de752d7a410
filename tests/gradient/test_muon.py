"""DeepSpeed's Muon optimizer and ZenFlow with ``"agoq"`` (real DeepSpeed engines, gloo ranks).

* **ZeRO stage 0**: agoq's 8-bit all-reduce leaves whole matrices in ``param.grad`` and Muon
  orthogonalises them in its own step, as stock does. Checked against stock Muon on the same data:
  through agoq's reduction in fp32 (``gradient.min_numel`` above the model) the gradients Muon steps
  on equal stock's up to the order of fp32 sums and so do the updates; in 8 bits the gradients lie
  within the 8-bit path's bound (``parity_workers.update_bound``: ``Q S (1 + Q/127) / 127``,
  ``Q = K (N + 1)``).
* **ZeRO-1/2/3**: DeepSpeed's ZeRO optimizers build Muon's update from whole matrices that they
  all-reduce, which the 8-bit reduce-scatter does not deliver. With ``"agoq": {}`` gradients take
  DeepSpeed's own path (activations still quantized) and train exactly as stock; an explicit
  ``gradient.enabled: true`` is refused naming Muon. ZenFlow likewise.
"""

from __future__ import annotations

import pytest
import torch

from agoq_ds.testing.distributed import run_ranks
from tests.gradient.muon_workers import GA, muon_config, muon_step
from tests.integration import engine_workers as ew

pytestmark = pytest.mark.slow

WORLD = 2


def _max_abs(a: dict[str, list], b: dict[str, list]) -> float:
    return max(float((torch.tensor(a[n]) - torch.tensor(b[n])).abs().max()) for n in a)


@pytest.fixture(scope="module")
def stage0() -> dict[str, list[dict]]:
    off = {"activation": {"enabled": False}}
    runs = {
        "stock": muon_config(0, None),
        "exact": muon_config(0, {**off, "gradient": {"enabled": True, "min_numel": 10**9}}),
        "8bit": muon_config(0, {**off, "gradient": {"enabled": True, "min_numel": 0, "rounding": "nearest"}}),
    }
    return {name: run_ranks(muon_step, WORLD, (cfg,), timeout=600) for name, cfg in runs.items()}


def test_muon_at_stage0_steps_on_agoqs_whole_matrix_gradients(stage0: dict[str, list[dict]]) -> None:
    for rank in range(WORLD):
        stock, exact, eight = (stage0[k][rank] for k in ("stock", "exact", "8bit"))
        assert stock["optimizer"] == exact["optimizer"] == eight["optimizer"] == "MuonWithAuxAdam"
        assert not stock["gradient_path"] and exact["gradient_path"] and eight["gradient_path"]
        assert any(stock["use_muon"].values()) and not all(stock["use_muon"].values())
        s = stock["magnitude"]
        # fp32 sums in another order: rounding only.
        assert _max_abs(exact["grads"], stock["grads"]) <= 2.0**-20 * s * GA * WORLD
        # Newton-Schulz runs in bf16, so fp32 rounding differences may flip a bf16 rounding (2^-8).
        largest_update = max(max(abs(v) for v in u) for u in stock["updates"].values())
        assert _max_abs(exact["updates"], stock["updates"]) <= 2.0**-7 * largest_update
        q = GA * (WORLD + 1)
        bound = q * s * (1 + q / 127) / 127
        error = _max_abs(eight["grads"], stock["grads"])
        assert 0 < error <= bound, (error, bound)


@pytest.mark.parametrize("stage", [1, 2])
def test_muon_above_stage0_trains_as_stock_with_the_default_block(stage: int) -> None:
    opt = {"type": "Muon", "params": {"lr": 0.01}}
    zero = {"stage": stage, "reduce_bucket_size": 200_000}
    stock = run_ranks(ew.uninterrupted, WORLD, (ew.ds_config(optimizer=opt, zero_optimization=zero), 2))
    only_gradients = ew.ds_config(agoq={"activation": {"enabled": False}}, optimizer=opt, zero_optimization=zero)
    assert run_ranks(ew.uninterrupted, WORLD, (only_gradients, 2)) == stock  # DeepSpeed's own path, bit for bit
    (out,) = run_ranks(ew.offload_outcome, 1, (ew.ds_config(agoq={}, optimizer=opt, zero_optimization=zero),))
    assert out["engine"] == "AgoqEngine" and not out["gradient_path"] and out["avg_bits"] < 9.0, out
    explicit = ew.ds_config(agoq={"gradient": {"enabled": True}}, optimizer=opt, zero_optimization=zero)
    (error,) = run_ranks(ew.initialize_error, 1, (explicit,))
    assert "UnsupportedConfigError" in error and "Muon" in error and "whole" in error, error


def test_zenflow_trains_as_stock_with_the_default_block() -> None:
    zero = {
        "stage": 2,
        "reduce_bucket_size": 200_000,
        "offload_optimizer": {"device": "cpu"},
        "zenflow": {
            "topk_ratio": 0.1,
            "update_interval": 2,
            "select_strategy": "step",
            "select_interval": 2,
            "full_warm_up_rounds": 0,
            "overlap_step": False,
        },
    }
    opt = {"type": "AdamW", "params": {"lr": 3e-3}}  # ZenFlow builds its own CPU Adam (no torch_adam key)
    stock = run_ranks(ew.uninterrupted, 1, (ew.ds_config(optimizer=opt, zero_optimization=zero), 2))
    only_gradients = ew.ds_config(agoq={"activation": {"enabled": False}}, optimizer=opt, zero_optimization=zero)
    assert run_ranks(ew.uninterrupted, 1, (only_gradients, 2)) == stock
    (out,) = run_ranks(ew.offload_outcome, 1, (ew.ds_config(agoq={}, optimizer=opt, zero_optimization=zero),))
    assert out["engine"] == "AgoqEngine" and not out["gradient_path"] and out["avg_bits"] < 9.0, out
    explicit = ew.ds_config(agoq={"gradient": {"enabled": True}}, optimizer=opt, zero_optimization=zero)
    (error,) = run_ranks(ew.initialize_error, 1, (explicit,))
    assert "UnsupportedConfigError" in error and "zenflow" in error, error
