"""A 2-stage DeepSpeed PipelineModule of HF LLaMA layers on 2 gloo ranks: quantizing activation
checkpointing (DeepSpeed's function swapped, and passed explicitly) and stage-aware bit balancing."""

from __future__ import annotations

import numpy as np
import pytest

from agoq_ds.testing.distributed import run_ranks
from tests.activation.pipe_workers import pipeline_runs

STEPS = 3


@pytest.fixture(scope="module")
def runs():
    scenarios = [
        dict(activation=None, checkpoint="deepspeed", steps=STEPS),
        dict(activation={}, checkpoint="deepspeed", steps=STEPS),
        dict(activation={}, checkpoint="agoq", steps=STEPS),
        dict(activation={"pipeline": {"mode": "stage_aware"}}, checkpoint=None, steps=STEPS),
    ]
    per_rank = run_ranks(pipeline_runs, 2, (scenarios,))
    return [[rank[i] for rank in per_rank] for i in range(len(scenarios))]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
@pytest.mark.parametrize("which", [1, 2], ids=["deepspeed-func-swapped", "agoq-func"])
def test_checkpointed_pipeline_quantizes_block_inputs(runs, which):
    base, quant = runs[0], runs[which]
    for b, q in zip(base, quant, strict=True):
        assert q["checkpoint_func"] == "QuantizingCheckpoint"
        assert q["losses"][0] == b["losses"][0]  # quantization never changes a forward
        assert abs(q["losses"][-1] - b["losses"][-1]) < 0.01 * b["losses"][-1]
        for name, delta in b["deltas"].items():
            if np.linalg.norm(delta) > 0:
                assert _cos(delta, q["deltas"][name]) > 0.999, name
        classes = {k.split("/")[1] for k in q["stats"][-1] if k.startswith("class/")}
        assert "checkpoint_input" in classes
        assert q["stats"][-1]["class/checkpoint_input/avg_bits"] < 8.5
        assert q["stats"][-1]["live_bytes"] == 0


@pytest.mark.slow
def test_stage_aware_balances_peak_bytes_within_tolerance(runs):
    base, ranks = runs[0], runs[3]
    stage0, stage1 = sorted(ranks, key=lambda r: r["stage"])
    peaks = stage0["stage_peaks"]
    assert peaks == stage1["stage_peaks"]  # both stages computed the same plan
    before, after = peaks["before"], peaks["after"]
    spread = lambda p: max(p.values()) / min(p.values()) - 1  # noqa: E731
    assert spread(before) > 0.15  # 2 decoder layers on stage 0 vs 1 layer + head on stage 1
    assert spread(after) <= 0.15
    assert stage0["overrides"] and not stage1["overrides"]  # only the heavy stage was lowered
    for rank in (stage0, stage1):
        # the model matches what the stages then measure: holds x stored bytes per micro-batch
        measured = rank["holds"] * rank["stats"][-1]["stored_bytes_per_forward"]
        assert measured == pytest.approx(after[rank["stage"]], rel=0.01)
    measured = {r["stage"]: r["holds"] * r["stats"][-1]["stored_bytes_per_forward"] for r in ranks}
    assert spread(measured) <= 0.15
    for b, q in zip(base, ranks, strict=True):
        assert q["losses"][0] == b["losses"][0]
        assert abs(q["losses"][-1] - b["losses"][-1]) < 0.02 * b["losses"][-1]
