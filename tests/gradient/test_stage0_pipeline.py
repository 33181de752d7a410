"""8-bit gradients without ZeRO partitioning (ZeRO stage 0, ``BF16_Optimizer``) and in the pipeline
engine, on real gloo ranks (2 data-parallel ranks; 2 stages x 2 data-parallel ranks), through the
AGoQ engines, against fp32 references and stock DeepSpeed. Scenarios: ``stage0_workers.py``.

Accumulation bound (``test_accumulated_gradient_within_bound``), per element, N ranks, K micro-
batches: the int8 accumulator requantizes the running sum after each micro-batch it holds (K-1 on the
``param.grad`` path, where the boundary micro-batch stays in ``param.grad``; K in ``BF16_Optimizer``),
each time erring by at most one step ``s = absmax/127`` of the group (stochastic rounding; half a step
round-to-nearest), with the absmax bounded by the exact running sum's plus the error so far; then
``all_reduce_8bit`` adds one sender-side quantization per non-owner rank and one owner-side
quantization before the int8 all-gather. ``stage0_workers.accumulation_bound`` evaluates exactly this
on the actual gradients; the test asserts the measured error never exceeds it.
"""

from __future__ import annotations

import pytest

from agoq_ds.testing.distributed import run_ranks
from tests.gradient.stage0_workers import world2, world4_pipeline

pytestmark = pytest.mark.slow

PARITY_STEPS = 20
"""Optimizer steps of the parity runs (tiny LLaMA, 2 micro-batches each)."""
PARITY_TOL = 0.01
"""Relative tolerance on every step's loss, agoq versus stock DeepSpeed. The 8-bit round trip
perturbs each gradient element by well under 1% of its group's absmax, unbiased; over 20 short steps
the two runs stay within about 0.1% (bf16 routes: bf16 rounding of the weights adds about as much),
so 1% leaves room for platform noise while still catching a wrong scale, a dropped micro-batch or
a gradient mixed across ranks (each of those moves the loss by several percent)."""
PIPE_STEPS = 3
"""Pipeline steps per route (4 micro-batches each)."""


@pytest.fixture(scope="module")
def ws2(tmp_path_factory) -> list[dict]:
    return run_ranks(world2, 2, (str(tmp_path_factory.mktemp("agoq_s0_ckpt")), PARITY_STEPS))


@pytest.fixture(scope="module")
def ws4(tmp_path_factory) -> list[dict]:
    return run_ranks(world4_pipeline, 4, (str(tmp_path_factory.mktemp("agoq_pipe_ckpt")), PIPE_STEPS))


# --- (1) accumulation + all-reduce versus fp32 ---------------------------------------------------


@pytest.mark.parametrize("route", ["s0_fp32", "s1_bf16_fp32acc"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("k", [1, 8, 32])
def test_accumulated_gradient_within_bound(ws2: list[dict], route: str, rounding: str, k: int) -> None:
    rows = [result["accumulation"][f"{route}_{rounding}_k{k}"] for result in ws2]
    for rank, r in enumerate(rows):
        assert r["optimizer"] == ("AdamW" if route == "s0_fp32" else "AgoqBF16Optimizer")
        assert r["max_err_over_bound"] <= 1.0, (rank, r)
        # Stochastic rounding without error feedback: the relative error grows like sqrt(K), ~4% at K=32
        # on this small MLP; a misplaced slice or a wrong scale gives O(1).
        assert r["rel"] < 0.06, (rank, r)
    assert len({r["digest"] for r in rows}) == 1  # the all-reduced gradient is bit-identical on every rank


# --- (2) Inf / NaN --------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["s0_fp32", "s0_bf16", "s1_bf16_fp32acc"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_gradient_same_outcome_as_stock(ws2: list[dict], route: str, value: str) -> None:
    for rank, result in enumerate(ws2):
        run = result["overflow"][f"{route}_{value}"]
        stock, agoq = run["stock"], run["agoq"]
        assert agoq["skipped"] == stock["skipped"], (rank, stock, agoq)
        assert agoq["rows"] == stock["rows"], (rank, stock, agoq)
    if route != "s0_fp32":  # the bf16 optimizers detect it and skip the step; fp32 stage 0 has no check
        assert ws2[0]["overflow"][f"{route}_{value}"]["stock"]["skipped"] == 1


# --- (3) training parity and bytes ----------------------------------------------------------------


@pytest.mark.parametrize("route", ["s0_fp32", "s0_bf16", "s1_bf16_fp32acc"])
def test_training_matches_stock_deepspeed(ws2: list[dict], route: str) -> None:
    run = ws2[0]["parity"][route]
    stock, agoq = run["stock"], run["agoq"]
    assert agoq["engine"] == "AgoqEngine" and stock["engine"] == "DeepSpeedEngine"
    assert len(agoq["losses"]) == PARITY_STEPS
    assert stock["losses"][-1] < stock["losses"][0] - 0.5  # it learns
    for s, a in zip(stock["losses"], agoq["losses"], strict=True):
        assert abs(a - s) <= PARITY_TOL * s, (stock["losses"], agoq["losses"])
    assert len({result["parity"][route]["agoq"]["params"] for result in ws2}) == 1  # replicas stay identical


@pytest.mark.parametrize("route", ["s0_fp32", "s0_bf16", "s1_bf16_fp32acc"])
def test_bytes_per_step(ws2: list[dict], route: str) -> None:
    for result in ws2:
        stats = result["parity"][route]["agoq"]["stats"]
        assert stats["gradient/micro_steps"] == 2
        assert stats["gradient/buffer_bytes"] > 0
        assert stats["gradient/buffer_bytes_ratio_fp32"] <= 0.27, stats
        assert stats["gradient/comm_bytes_ratio_bf16"] <= 0.53, stats
        assert stats["gradient/state_bytes_ratio_fp32"] <= 0.27, stats  # no error feedback by default


# --- (4) checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["s0_fp32", "s1_bf16_fp32acc"])
def test_checkpoint_resumes_exactly_and_interoperates_with_stock(ws2: list[dict], route: str) -> None:
    for rank, result in enumerate(ws2):
        r = result["checkpoint"][route]
        assert r["residual_nonzero"] and r["residual_restored"], (rank, r)
        assert r["resumed"] == pytest.approx(r["uninterrupted"], rel=1e-6, abs=1e-7), (rank, r)
        assert r["plain_state"] and r["weights_only_ok"], (rank, r)
        assert r["stock_loads_agoq"] and r["agoq_loads_stock"] and r["agoq_from_stock_zero_residual"], (rank, r)
        if route == "s0_fp32":  # stage 0: per-rank agoq files beside DeepSpeed's
            assert f"agoq_gradients_rank_{rank:05d}.pt" in r["files"], r["files"]


# --- (5) pipeline: 2 stages x 2 data-parallel ranks -----------------------------------------------


PIPE_OPTIMIZERS = {
    "s0_fp32": ("AdamW", "AdamW"),
    "s0_bf16": ("BF16_Optimizer", "AgoqBF16Optimizer"),
    "s1_bf16": ("DeepSpeedZeroOptimizer", "AgoqZeroOptimizer"),
    "s1_bf16_fp32acc": ("BF16_Optimizer", "AgoqBF16Optimizer"),
}


@pytest.mark.parametrize("route", list(PIPE_OPTIMIZERS))
def test_pipeline_two_stages_two_replicas(ws4: list[dict], route: str) -> None:
    runs = [result["runs"][route] for result in ws4]
    assert sorted((r["agoq"]["stage"], r["agoq"]["dp_rank"]) for r in runs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in runs:
        stock, agoq = r["stock"], r["agoq"]
        assert (stock["engine"], agoq["engine"]) == ("PipelineEngine", "AgoqPipelineEngine")
        assert (stock["optimizer"], agoq["optimizer"]) == PIPE_OPTIMIZERS[route]
        for s, a in zip(stock["losses"], agoq["losses"], strict=True):
            assert abs(a - s) <= PARITY_TOL * s, (stock["losses"], agoq["losses"])
        stats = agoq["stats"]
        assert stats["gradient/micro_steps"] == 4  # 1F1B: every micro-batch folded, one reduction
        assert stats["gradient/buffer_bytes_ratio_fp32"] <= 0.27, stats
        assert stats["gradient/comm_bytes_ratio_bf16"] <= 0.53, stats
    for stage in (0, 1):  # the two data-parallel replicas of a stage hold identical weights
        assert len({r["agoq"]["params"] for r in runs if r["agoq"]["stage"] == stage}) == 1


def test_pipeline_bf16_stage0_checkpoint_resumes(ws4: list[dict]) -> None:
    for result in ws4:
        r = result["resume"]
        assert r["resumed"] == pytest.approx(r["uninterrupted"], rel=1e-6, abs=1e-7), r
