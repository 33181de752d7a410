"""``engine.compile()`` with an ``"agoq"`` block (issue 26): it trains, the compiled graphs store
agoq's quantized activations (bytes as eager agoq stores), and 30 steps' losses stay within the
quantizer's noise of eager agoq's. Real DeepSpeed engines on a gloo rank, paired data and seeds."""

from __future__ import annotations

import pytest

from agoq_ds.testing.distributed import run_ranks

from . import compile_workers as cw

STEPS = 30


def _max_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_compiled_agoq_trains_like_eager_agoq(bf16):
    runs = {
        label: run_ranks(cw.compiled_run, 1, (agoq, compile_, bf16, 2, STEPS), timeout=900)[0]
        for label, agoq, compile_ in [
            ("stock", None, False),
            ("stock_compiled", None, True),
            ("agoq", {}, False),
            ("agoq_compiled", {}, True),
        ]
    }
    compiled = runs["agoq_compiled"]
    # The compiled model ran compiled (after the eager first step), with agoq's hooks in its graph.
    assert compiled["graphs"] >= 1 and compiled["runs"] == 2 * (STEPS - 1)
    assert compiled["rebuilt"] > 0 and compiled["eager_saved"] == 0
    # Same stored bytes as eager agoq, within what the partitioner's choice of saved tensors moves.
    eager_bytes = runs["agoq"]["stats"]["activation/stored_bytes_per_forward"]
    compiled_bytes = compiled["stats"]["activation/stored_bytes_per_forward"]
    assert 0.75 * eager_bytes <= compiled_bytes <= 1.25 * eager_bytes, (compiled_bytes, eager_bytes)
    # Stored at 8 bits + a bf16 scale per 128 elements (the rest rebuilt), plus the few values kept
    # as they are (per-row statistics): at most 15% above 8.125 bits per element of the graph's saves.
    bound = 1.15 * 8.125 / (16 if bf16 else 32)
    assert compiled_bytes <= bound * compiled["stats"]["activation/baseline_bytes_per_forward"]
    # Noise: how far quantization moves eager losses from stock's, plus how far compiling moves stock's.
    noise = _max_gap(runs["agoq"]["losses"], runs["stock"]["losses"]) + _max_gap(
        runs["stock_compiled"]["losses"], runs["stock"]["losses"]
    )
    gap = _max_gap(compiled["losses"], runs["agoq"]["losses"])
    assert gap <= noise, (gap, noise)
    assert compiled["losses"][-1] < compiled["losses"][0] - 0.5  # it learns


def test_compiled_agoq_at_zero3_stores_quantized():
    """ZeRO-3 gathers parameters between modules: Dynamo compiles one graph per module frame; agoq names
    each graph's module from its parameters and stores quantized there too."""
    out = run_ranks(cw.compiled_run, 1, ({}, True, False, 3, 3), timeout=900)[0]
    assert out["graphs"] > 1 and out["runs"] > 0
    stats = out["stats"]
    assert stats["activation/stored_bytes_per_forward"] <= 0.35 * stats["activation/baseline_bytes_per_forward"]
    assert stats["activation/class/qkv_input/stored_bytes"] > 0  # attributed to the projections' class


def test_compiled_agoq_in_the_pipeline_engine():
    """DeepSpeed compiles a ``PipelineModule`` layer by layer; the AGoQ pipeline engine runs each stage's
    forward in agoq's compiled scope (its loss function, eager, is packed by the eager recorder)."""
    from . import pipe_compile_workers as pw

    runs = {
        label: run_ranks(pw.pipeline_compiled_run, 2, (agoq, compile_, 4), timeout=900)
        for label, agoq, compile_ in [
            ("stock", None, False),
            ("stock_compiled", None, True),
            ("agoq", {}, False),
            ("agoq_compiled", {}, True),
        ]
    }
    last = -1  # the last stage reports the losses
    noise = _max_gap(runs["agoq"][last]["losses"], runs["stock"][last]["losses"]) + _max_gap(
        runs["stock_compiled"][last]["losses"], runs["stock"][last]["losses"]
    )
    assert _max_gap(runs["agoq_compiled"][last]["losses"], runs["agoq"][last]["losses"]) <= noise + 1e-6
    for eager, compiled in zip(runs["agoq"], runs["agoq_compiled"], strict=True):
        stats = compiled["stats"]
        assert stats["activation/compiled_graphs"] >= 1 and stats["activation/compiled_runs"] >= 2, stats
        eager_bytes = eager["stats"]["activation/stored_bytes_per_forward"]
        assert stats["activation/stored_bytes_per_forward"] <= 1.25 * eager_bytes


def test_regional_compilation_is_refused_with_a_clear_message():
    (message,) = run_ranks(cw.regional_compile_error, 1, (), timeout=600)
    assert message.startswith("AgoqConfigError"), message
    assert "model.layers.0" in message and "engine.compile()" in message


def test_compiled_agoq_at_zero1_is_one_graph_with_the_rebuilds():
    out = run_ranks(cw.compiled_run, 1, ({}, True, False, 1, 3), timeout=900)[0]
    assert out["graphs"] == 1 and out["runs"] == 4 and out["rebuilt"] > 0
    stats = out["stats"]
    # Rebuilt from the norm's 8-bit input in backward, so never saved (eager counts it as 0 bytes).
    assert stats.get("activation/class/qkv_input/stored_bytes", 0.0) == 0
    assert stats["activation/class/attn_norm_input/stored_bytes"] > 0
