"""The modelled GPU cost (``agoq-ds cost``): what each change of the GPU-step issue removes, per step.
Its launch counts are checked against a real model's in tests/benchmarks/test_launch_count_smoke.py."""

from __future__ import annotations

from agoq_ds.cli import main
from agoq_ds.gpu_cost import STATES, step_cost


def test_each_change_removes_launches_and_traffic_at_the_h200_shapes() -> None:
    for shape in ("0.76b", "76m"):
        before, unfused, fused = (step_cost(shape, s) for s in STATES)
        # Dequantize once: one dequantize per quantize; the bytes it removes are whole spans.
        assert unfused.launches["dequantize"] == unfused.launches["quantize"] < before.launches["dequantize"]
        assert before.read + before.written > unfused.read + unfused.written
        # Fused: no recipe op left, and half the spans are read inside the fused kernels.
        assert not {"mul", "silu", "_to_copy"} & set(fused.launches)
        assert fused.launches["dequantize"] < unfused.launches["dequantize"]
        assert fused.total_launches < unfused.total_launches < before.total_launches
        assert fused.read + fused.written < unfused.read + unfused.written


def test_the_double_dequantize_cost_what_the_issue_estimated() -> None:
    # Issue 23: "about 21 GB of extra HBM traffic and about 240 extra launches per step" at 0.76B.
    before, unfused = step_cost("0.76b", "before"), step_cost("0.76b", "unfused")
    removed_gb = (before.read + before.written - unfused.read - unfused.written) / 1e9
    assert 15 < removed_gb < 25, removed_gb
    assert 150 < before.total_launches - unfused.total_launches < 300


def test_cost_command_prints_the_three_states(capsys) -> None:
    assert main(["cost", "--shape", "76m"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{s} " in out for s in STATES), out
